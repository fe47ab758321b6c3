"""Fine-tuning through `llaunch run`: LoRA on SFT JSONL end to end, early stopping, bad lines before launch,
and the arithmetic exact-match evaluator."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from examples import arithmetic
from launcher.cli import main
from launcher.train.sft import format_prompt
from tests.tiny_run import padded_batch


@pytest.fixture(scope="module")
def arith(tmp_path_factory):
    root = tmp_path_factory.mktemp("arith")
    records = arithmetic.make_records(240, seed=0, max_operand=20)
    arithmetic.write_jsonl(records[40:], root / "train.jsonl")
    arithmetic.write_jsonl(records[:40], root / "eval.jsonl")
    texts = [format_prompt(r["instruction"]) + r["output"] for r in records]
    arithmetic.make_base_model(root / "base", texts, hidden_size=32, layers=2)
    return root, records


def write_config(path, root, **training):
    config = {
        "model": {"name_or_path": str(root / "base")},
        "data": {"dataset_format": "alpaca", "train_files": [str(root / "train.jsonl")],
                 "eval_files": [str(root / "eval.jsonl")], "block_size": 96},
        "finetune": {"method": "lora", "r": 4, "lora_dropout": 0.0, "modules_to_save": ["lm_head"]},
        "training": {"learning_rate": 5e-3, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                     "logging_steps": 1, "save_strategy": "no", "bf16": False, **training},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_lora_sft_run_saves_adapter_and_generate_uses_it(arith, tmp_path, capsys):
    root, _ = arith
    out = tmp_path / "run"
    config = write_config(tmp_path / "sft.yaml", root, max_steps=12, eval_steps=6, lr_scheduler_type="step",
                          lr_scheduler_kwargs={"step_size": 4, "gamma": 0.5})
    assert main(["run", str(config), "--output-dir", str(out)]) == 0
    final = sorted(p.name for p in (out / "final").iterdir())
    assert "adapter_model.safetensors" in final and "model.safetensors" not in final
    rows = metrics(out)
    train = [r for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert train[-1]["loss"] < train[0]["loss"] and evals[-1] < evals[0]
    assert [round(r["lr"], 6) for r in train][::4] == [5e-3, 2.5e-3, 1.25e-3]  # the step schedule was used
    capsys.readouterr()
    assert main(["generate", "--model", str(out / "final"), "--instruction", "--prompt", "What is 3 + 4?",
                 "--max-new-tokens", "4", "--temperature", "0"]) == 0
    answer = capsys.readouterr().out.strip()
    assert len(answer) <= 4  # only the answer is printed, not the prompt
    assert main(["export", str(out / "final"), "--merge", "--to", str(tmp_path / "merged")]) == 0
    merged = sorted(p.name for p in (tmp_path / "merged").iterdir())
    assert "model.safetensors" in merged and "tokenizer.json" in merged and "adapter_config.json" not in merged


def test_early_stopping_stops_at_the_eval_where_patience_runs_out(arith, tmp_path):
    root, _ = arith
    out = tmp_path / "run"
    # A threshold no eval can beat: the first eval sets the best, the next `patience` evals do not improve.
    config = write_config(tmp_path / "es.yaml", root, max_steps=30, eval_steps=2, early_stopping_patience=2,
                          early_stopping_threshold=100.0, group_by_length=True)
    data = yaml.safe_load(config.read_text())
    data["data"]["packing"] = False  # one example per row, batches grouped by length and trimmed
    config.write_text(yaml.safe_dump(data))
    assert main(["run", str(config), "--output-dir", str(out)]) == 0
    rows = metrics(out)
    assert max(r["step"] for r in rows if "loss" in r) == 6
    assert [r["step"] for r in rows if "eval_loss" in r][:3] == [2, 4, 6]


def test_bad_sft_line_fails_before_any_process_starts(arith, tmp_path, capsys):
    root, _ = arith
    bad = tmp_path / "bad.jsonl"
    bad.write_text((root / "train.jsonl").read_text() + '{"instruction": "What is 1 + 1?"}\n')
    config = write_config(tmp_path / "bad.yaml", root, max_steps=2)
    data = yaml.safe_load(config.read_text())
    data["data"]["train_files"] = [str(bad)]
    config.write_text(yaml.safe_dump(data))
    assert main(["run", str(config), "--output-dir", str(tmp_path / "out")]) == 2
    assert "bad.jsonl:201: an Alpaca record needs a string 'output'" in capsys.readouterr().err
    assert not (tmp_path / "out" / "plan.yaml").exists()


def test_exact_match_scores_only_exact_answers(arith):
    """A model trained until it has memorised four questions scores 100% on them and 0% on wrong references;
    the untrained base scores 0%. Training stops when the evaluator says 100% (checked every 25 steps, at most
    1000): how many steps that takes depends on library versions and thread counts, what the score means does not."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher.train import sft

    root, records = arith
    tokenizer = AutoTokenizer.from_pretrained(root / "base")
    model = AutoModelForCausalLM.from_pretrained(root / "base")
    model.config.use_cache = False
    four = records[:4]
    assert arithmetic.exact_match(model.eval(), tokenizer, four) == 0.0
    examples = [sft.tokenize_segments(sft.record_segments(r, tokenizer), tokenizer, 96) for r in four]
    batch = padded_batch(examples, tokenizer.pad_token_id)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(1, 1001):
        model.train()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 25 == 0 and arithmetic.exact_match(model.eval(), tokenizer, four) == 1.0:
            break
    assert arithmetic.exact_match(model.eval(), tokenizer, four) == 1.0, f"not memorised in {step} steps"
    wrong = [dict(r, output=str(int(r["output"]) + 1)) for r in four]
    assert arithmetic.exact_match(model, tokenizer, wrong) == 0.0


def full_run(root, tmp_path, name: str, overrides: list[str]) -> dict:
    """One full fine-tuning run of the fixture's base with plain SGD at a constant LR; returns its final weights."""
    from safetensors.torch import load_file

    config = write_config(tmp_path / f"{name}.yaml", root, lr_scheduler_type="constant", warmup_steps=0,
                          optim="sgd", weight_decay=0.0, learning_rate=0.1, eval_steps=None)
    out = tmp_path / name
    assert main(["run", str(config), "--output-dir", str(out), "finetune.method=full", "finetune.modules_to_save=[]",
                 *overrides]) == 0
    return {"weights": load_file(out / "final" / "model.safetensors"), "losses": [r["loss"] for r in metrics(out) if "loss" in r]}


def largest_update(root, weights: dict) -> float:
    from safetensors.torch import load_file

    base = load_file(root / "base" / "model.safetensors")
    return max((weights[k] - base[k]).abs().max().item() for k in base)


def test_clip_by_value_bounds_every_element_of_the_update(arith, tmp_path):
    """One SGD step moves each weight by lr * grad; with max_grad_value v no weight moves more than lr * v."""
    root, _ = arith
    v = 1e-4
    clipped = full_run(root, tmp_path, "clipped", ["--max-steps", "1", "training.max_grad_norm=0",
                                                   f"training.max_grad_value={v}"])
    free = full_run(root, tmp_path, "free", ["--max-steps", "1", "training.max_grad_norm=0"])
    assert 0 < largest_update(root, clipped["weights"]) <= 0.1 * v * 1.01  # fp32 rounding of w + dw
    assert largest_update(root, free["weights"]) > 10 * 0.1 * v  # the clip had something to clip


def test_torch_compile_trains_to_the_same_losses(arith, tmp_path):
    root, _ = arith
    eager = full_run(root, tmp_path, "eager", ["--max-steps", "3"])
    compiled = full_run(root, tmp_path, "compiled", ["--max-steps", "3", "training.torch_compile=true"])
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-4)


def test_strategies_refuse_what_they_cannot_do_before_any_process_starts(arith, tmp_path, capsys):
    root, _ = arith
    config = write_config(tmp_path / "ds.yaml", root, max_steps=2)
    for strategy, override, words in (
            ("zero2", "training.max_grad_value=1.0", "clips gradients only by norm"),
            ("zero2", "training.torch_compile=true", "torch_compile is supported with ddp, fsdp, hsdp"),
            ("zero2", "finetune.method=qlora", "QLoRA's 4-bit base runs under ddp, fsdp, hsdp, zero3")):
        assert main(["run", str(config), "--output-dir", str(tmp_path / "out"), "--strategy", strategy, override]) == 2
        assert words in capsys.readouterr().err
    assert not (tmp_path / "out" / "plan.yaml").exists()


def test_optimizer_in_backward_trains_like_a_step_after_backward_and_resumes_exactly(arith, tmp_path):
    """AdamW stepped weight by weight inside backward = AdamW stepped after it; a resume from its checkpoint
    (the one optimizer's state) continues to the same weights."""
    root, _ = arith
    adamw = ["training.optim=adamw_torch", "training.learning_rate=1e-2", "training.max_grad_norm=0",
             "training.save_strategy=steps", "training.save_steps=1"]
    after = full_run(root, tmp_path, "after", ["--max-steps", "2", *adamw])
    during = full_run(root, tmp_path, "during", ["--max-steps", "2", *adamw, "training.optimizer_in_backward=true"])
    assert during["losses"] == pytest.approx(after["losses"], rel=1e-5)
    assert max((during["weights"][k] - after["weights"][k]).abs().max().item() for k in after["weights"]) < 1e-6
    resumed = full_run(root, tmp_path, "resumed", ["--max-steps", "2", *adamw, "training.optimizer_in_backward=true",
                                                   f"training.resume_from_checkpoint={tmp_path / 'during' / 'checkpoints' / 'step-1'}"])
    assert all(torch.equal(resumed["weights"][k], during["weights"][k]) for k in during["weights"])


def test_optimizer_in_backward_refuses_clipping_and_accumulation_before_any_process_starts(arith, tmp_path, capsys):
    root, _ = arith
    config = write_config(tmp_path / "oib.yaml", root, max_steps=2, optimizer_in_backward=True)
    for override, words in (("training.max_grad_norm=1.0", "cannot clip"),
                            ("training.gradient_accumulation_steps=2", "without gradient accumulation")):
        assert main(["run", str(config), "--output-dir", str(tmp_path / "out"), "training.max_grad_norm=0",
                     override]) == 2
        assert words in capsys.readouterr().err
    assert not (tmp_path / "out" / "plan.yaml").exists()
