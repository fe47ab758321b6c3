"""SFT data: prompt masking, chat templates, packing that keeps examples apart, bad lines named file:line."""

import json

import numpy as np
import pytest
import torch

from launcher.errors import LaunchError
from launcher.train import sft
from launcher.train.data import StepSampler
from tests.tiny_run import padded_batch
from tiny_lm import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def summed_loss(model, batch):
    """Sum (not mean) of token losses, so rows with different label counts compare exactly."""
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                             ignore_index=sft.IGNORE_INDEX, reduction="sum")


def test_alpaca_masks_exactly_the_prompt(tok):
    record = {"instruction": "What is 12 + 7?", "input": "", "output": "19"}
    ex = sft.tokenize_segments(sft.record_segments(record, tok), tok, max_length=64)
    prompt_ids = tok(sft.format_prompt("What is 12 + 7?"))["input_ids"]
    answer_ids = tok("19" + tok.eos_token, add_special_tokens=False)["input_ids"]
    assert ex.input_ids == prompt_ids + answer_ids
    assert ex.labels == [sft.IGNORE_INDEX] * len(prompt_ids) + answer_ids
    assert ex.labels[-1] == tok.eos_token_id  # the model learns to stop


def test_prompt_tokens_contribute_nothing_to_the_loss(tok):
    """The loss is the mean over answer tokens only: its gradient w.r.t. the logits that predict prompt
    tokens is exactly zero, so whatever the model predicts there cannot move the loss."""
    model = tiny_llama(len(tok))
    ex = sft.tokenize_segments(sft.record_segments({"instruction": "What is 12 + 7?", "output": "19"}, tok), tok, 64)
    row = sft.row_array([ex], 64, tok.pad_token_id)  # the row the loop trains on
    batch = {field: torch.from_numpy(row[j:j + 1]) for j, field in enumerate(sft.ROW_FIELDS)}
    out = model(**batch)
    out.logits.retain_grad()
    out.loss.backward()
    grad_per_position = out.logits.grad[0].abs().sum(-1)  # position t predicts token t+1
    learned_next = torch.tensor(ex.labels[1:] + [sft.IGNORE_INDEX] * (batch["input_ids"].shape[1] - len(ex.labels)))
    assert torch.all(grad_per_position[:-1][learned_next == sft.IGNORE_INDEX] == 0)
    assert torch.all(grad_per_position[:-1][learned_next != sft.IGNORE_INDEX] > 0)
    # And the same text with the prompt *not* masked gives a different loss: the mask is doing something.
    in_example = torch.arange(64) < len(ex.input_ids)
    unmasked = dict(batch, labels=torch.where(in_example, batch["input_ids"], sft.IGNORE_INDEX))
    assert not torch.allclose(model(**unmasked).loss, out.loss)


def test_chat_fallback_template_learns_only_assistant_turns(tok):
    record = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"},
                           {"role": "assistant", "content": "general kenobi"}, {"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "yes"}]}
    ex = sft.tokenize_segments(sft.record_segments(record, tok), tok, 256)
    learned = tok.decode([i for i, label in zip(ex.input_ids, ex.labels) if label != sft.IGNORE_INDEX])
    assert learned == "general kenobi<eos>yes<eos>"
    assert tok.decode(ex.input_ids).startswith("<|system|>\nbe brief\n<|user|>\nhello there\n<|assistant|>\n")


def test_chat_uses_the_tokenizers_template_when_it_has_one(tok):
    templated = tiny_tokenizer()
    templated.chat_template = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% if m['role'] == "
                               "'assistant' %}<eos>{% endif %}{% endfor %}"
                               "{% if add_generation_prompt %}[assistant]{% endif %}")
    record = {"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "general kenobi"}]}
    ex = sft.tokenize_segments(sft.record_segments(record, templated), templated, 256)
    assert templated.decode(ex.input_ids) == "[user]hello there[assistant]general kenobi<eos>"
    learned = templated.decode([i for i, label in zip(ex.input_ids, ex.labels) if label != sft.IGNORE_INDEX])
    assert learned == "general kenobi<eos>"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_examples_do_not_attend_to_each_other(tok, attn):
    model = tiny_llama(len(tok), attn=attn)
    records = [{"instruction": "What is 12 + 7?", "output": "19"},
               {"instruction": "Add the numbers.", "input": "3 and 4", "output": "7"},
               {"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "general kenobi"}]}]
    examples = [sft.tokenize_segments(sft.record_segments(r, tok), tok, 128) for r in records]
    packed = sft.collate_packed([examples], max_length=256, pad_token_id=tok.pad_token_id)
    assert "attention_mask" not in packed
    with torch.no_grad():
        separate = sum(summed_loss(model, padded_batch([ex], tok.pad_token_id)) for ex in examples)
        together = summed_loss(model, packed)
        # Without restarting position_ids the model attends across examples: a different loss.
        leaked = summed_loss(model, dict(packed, position_ids=torch.arange(256)[None]))
    assert torch.allclose(together, separate, rtol=1e-5), (together, separate)
    assert abs(float(leaked - separate)) > 1e-2


def test_packing_fills_rows_without_splitting_examples(tok):
    examples = [sft.SFTExample([1] * n, [1] * n) for n in (30, 20, 15, 40, 10)]
    rows = sft.pack_examples(examples, max_length=64)
    assert rows == [[0, 1], [2, 3], [4]]
    assert all(sum(len(examples[i].input_ids) for i in row) <= 64 for row in rows)


def test_bad_line_names_file_and_line_and_can_be_skipped(tok, tmp_path, caplog):
    path = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "What is 1 + 1?", "output": "2"},
                                                  "{not json",
                                                  {"instruction": "What is 2 + 2?"},
                                                  {"instruction": "What is 3 + 3?", "output": "6"}])
    with pytest.raises(LaunchError, match=r"train\.jsonl:2: invalid JSON"):
        sft.load_sft_examples(path, tok, 64)
    with caplog.at_level("WARNING"):
        examples = sft.load_sft_examples(path, tok, 64, on_bad_line="skip")
    assert len(examples) == 2
    assert "train.jsonl:2" in caplog.text and "train.jsonl:3" in caplog.text and "'output'" in caplog.text


def test_corpus_serves_packed_and_unpacked_rows_with_every_learned_token_once(tok, tmp_path):
    records = [{"instruction": f"What is {i} + {i}?", "output": str(2 * i)} for i in range(20)]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    examples = sft.load_sft_examples(path, tok, 256)
    packed, unpacked = (sft.SFTCorpus(sft.SFTDataset(examples, 256, tok.pad_token_id, packing=p, seed=1), None,
                                      tok, ".") for p in (True, False))
    assert unpacked.num_train == 20 and packed.num_train < 20
    batch = packed.batch("train", np.array([0, 1]))
    assert set(batch) == set(sft.ROW_FIELDS) and batch["input_ids"].shape[0] == 2
    # Every learned token appears exactly once across the rows, and label_count counts it (after the shift).
    for corpus in (packed, unpacked):
        everything = np.arange(corpus.num_train)
        learned = int((corpus.batch("train", everything)["labels"][:, 1:] != sft.IGNORE_INDEX).sum())
        assert learned == corpus.label_count("train", everything) == packed.train.num_label_tokens


def test_length_grouped_order_groups_similar_lengths():
    lengths = list(range(1, 401))
    order = sft.length_grouped_order(lengths, group_size=2, seed=0, epoch=0)
    assert sorted(order.tolist()) == list(range(400))
    first = [lengths[i] for i in order[:100]]
    assert first == sorted(first, reverse=True)
    assert not (order == sft.length_grouped_order(lengths, 2, seed=0, epoch=1)).all()


def test_trimmed_rows_give_the_same_loss_with_less_padding(tok):
    model = tiny_llama(len(tok))
    records = [{"instruction": "What is 12 + 7?", "output": "19"}, {"instruction": "Add.", "output": "7"}]
    examples = [sft.tokenize_segments(sft.record_segments(r, tok), tok, 256) for r in records]
    rows = np.stack([sft.row_array([ex], 256, tok.pad_token_id) for ex in examples])
    trimmed = sft.trim_rows(rows)
    longest = max(len(ex.input_ids) for ex in examples)
    assert longest <= trimmed.shape[-1] < longest + 8 and trimmed.shape[-1] % 8 == 0
    full, short = ({k: torch.from_numpy(r[:, j]) for j, k in enumerate(sft.ROW_FIELDS)} for r in (rows, trimmed))
    with torch.no_grad():
        assert torch.allclose(summed_loss(model, full), summed_loss(model, short), rtol=1e-5)


def test_length_grouped_sampler_serves_similar_lengths_together(tok):
    examples = [sft.SFTExample([5] * n, [5] * n) for n in np.random.default_rng(0).integers(4, 200, 400)]
    corpus = sft.SFTCorpus(sft.SFTDataset(examples, 256, tok.pad_token_id, packing=False), None, tok, ".")
    assert corpus.epoch_order(4, 0, group_by_length=False) is None
    sampler = StepSampler(corpus.num_train, 4, 0, corpus.epoch_order(4, 0, group_by_length=True))
    indices, _, _ = sampler.next_step(0, 0)
    lengths = [len(examples[i].input_ids) for i in sampler.permutation(0)[:200]]
    assert lengths == sorted(lengths, reverse=True)  # one mega-batch of 50 batches, longest first
    assert sorted(sampler.permutation(1).tolist()) == list(range(400))
