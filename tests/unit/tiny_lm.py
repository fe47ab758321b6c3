"""A tiny tokenizer and a tiny random-init Llama, built in-process, for fine-tuning tests (nothing downloaded)."""

from __future__ import annotations

TEXTS = [
    "### Instruction:\nWhat is 12 + 7?\n\n### Response:\n19",
    "### Instruction:\nAdd the numbers.\n\n### Input:\n3 and 4\n\n### Response:\n7",
    "<|user|>\nhello there\n<|assistant|>\ngeneral kenobi\n<|system|>\nbe brief\n",
    "the quick brown fox jumps over the lazy dog 0123456789 + - * = ?",
]


def tiny_tokenizer(vocab_size: int = 200):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", bos_token="<eos>")


def tiny_llama(vocab_size: int, seed: int = 0, attn: str = "sdpa", hidden: int = 32):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False)
    model = LlamaForCausalLM._from_config(config, attn_implementation=attn, dtype=torch.float32)
    # Training never uses a KV cache; with one, transformers skips its packed-sequence (position_ids) masking.
    model.config.use_cache = False
    model.eval()
    return model
