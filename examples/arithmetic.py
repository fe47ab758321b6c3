"""A fine-tuning task with checkable answers: "What is 23 + 45?" -> "68", and held-out exact match.

Used by examples/arith_base.yaml and examples/sft_lora.yaml: accuracy on held-out questions before and after
fine-tuning is a number a user can trust, unlike a loss. LoRA adapts what a base model already knows (on a
random-init base it stays near 5 %, measured), so the example first makes a base that knows bare sums
("23 + 45" -> "68") by full fine-tuning, then teaches it with LoRA to answer the questions. Everything is
made here, nothing downloaded: a character-level tokenizer (one digit per token, never merged by BPE, which
is what lets a tiny model learn carrying) and a random-init Llama.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from launcher.errors import LaunchError

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]


def make_problems(count: int, seed: int, max_operand: int = 99, ops: str = "+-") -> list[tuple[int, str, int]]:
    """Distinct (a, op, b) (no duplicates, so a held-out split never leaks); subtraction never goes negative."""
    n = max_operand + 1
    space = n * n * ("+" in ops) + n * (n + 1) // 2 * ("-" in ops)
    if count > space:
        raise LaunchError(f"only {space} distinct questions exist with max_operand={max_operand}; ask for fewer.")
    rng = random.Random(seed)
    seen, problems = set(), []
    while len(problems) < count:
        a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice(ops)
        if op == "-" and b > a:
            a, b = b, a
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        problems.append((a, op, b))
    return problems


def as_record(problem: tuple[int, str, int], style: str = "question") -> dict:
    """An Alpaca record: "What is 23 + 45?" (style question) or the bare "23 + 45" (style expression)."""
    a, op, b = problem
    expression = f"{a} {op} {b}"
    instruction = f"What is {expression}?" if style == "question" else expression
    return {"instruction": instruction, "input": "", "output": str(a + b if op == "+" else a - b)}


def make_records(count: int, seed: int, max_operand: int = 99, ops: str = "+-", style: str = "question") -> list[dict]:
    return [as_record(problem, style) for problem in make_problems(count, seed, max_operand, ops)]


def write_jsonl(records: list[dict], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in records))


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def char_tokenizer(texts: list[str]):
    """A WordLevel tokenizer over single characters (every character of the texts + specials)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("".join(texts)) | set("0123456789+-?#:\n "))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def make_base_model(directory: str | Path, texts: list[str], hidden_size: int = 128, layers: int = 4,
                    seed: int = 0) -> Path:
    """A random-init Llama with the character tokenizer, saved as a local Hugging Face directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = char_tokenizer(texts)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=128, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def answers(model, tokenizer, records: list[dict], max_new_tokens: int = 6, batch_size: int = 64) -> list[str]:
    """Greedy answers to each record's prompt (the same prompt text SFT trained on), stripped of EOS/padding."""
    import torch

    from launcher.train.sft import format_prompt

    out: list[str] = []
    tokenizer.padding_side = "left"  # generation continues from the right end of each row
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        prompts = [format_prompt(r["instruction"], r.get("input", "")) for r in chunk]
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for row in gen[:, enc["input_ids"].shape[1]:]:
            out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return out


def exact_match(model, tokenizer, records: list[dict], **kwargs) -> float:
    """Share of records whose generated answer equals the reference exactly."""
    got = answers(model, tokenizer, records, **kwargs)
    return sum(g == r["output"].strip() for g, r in zip(got, records)) / max(1, len(records))
