"""The arithmetic fine-tuning pipeline (examples/arith_base.yaml, then examples/sft_lora.yaml) in a smaller
configuration: LoRA must teach a base that knows bare sums to answer held-out questions about them.

The shipped example (2-digit operands, 1500 + 600 steps, held-out problems left out of both stages) takes
about 9 minutes and its lift depends on how well the tiny base learns carrying, which float rounding alone
changes (2 % -> 52.5 % with seed 42, 1.5 % -> 23.5 % with seed 43): a threshold on it fails by luck, on
another CPU or library version. The shipped YAMLs are checked for validity by the examples matrix
(tests/distributed/test_examples.py). Here the operands are single digits (155 problems), the base (64 wide,
2 layers) learns every bare expression by heart, and LoRA learns the question format on all but 30 of them;
those 30 questions are the held-out set. What is measured is what LoRA does: adapt knowledge the base has to a
new task. Measured on 2 cores: base 20 % -> LoRA 96.7 % held-out exact match; the test asks for +40 points."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from examples import arithmetic
from launcher.cli import main
from launcher.train.adapters import load_for_generation

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--max-operand", "9", "--count", "155", "--eval-count", "30", "--hidden-size", "64", "--layers", "2"]


def held_out_exact_match(model_dir: Path, eval_file: Path) -> float:
    model, tokenizer = load_for_generation(model_dir)
    return arithmetic.exact_match(model, tokenizer, arithmetic.read_jsonl(eval_file))


def steps(n: int) -> list[str]:
    return [f"training.max_steps={n}", f"training.eval_steps={n}", f"training.save_steps={n}"]


@pytest.mark.timeout(1200)
def test_lora_lifts_held_out_exact_match_far_above_the_base(tmp_path):
    data = tmp_path / "arith"
    subprocess.run([sys.executable, str(REPO / "examples/make_arithmetic.py"), "data", "--out", str(data), *SMALL],
                   check=True, cwd=REPO)
    expressions = data / "expressions"
    base, lora = tmp_path / "arith-base", tmp_path / "arith-lora"
    assert main(["run", str(REPO / "examples/arith_base.yaml"), "--output-dir", str(base),
                 f"model.name_or_path={data / 'init'}",
                 f"data.train_files=[{expressions / 'train.jsonl'},{expressions / 'eval.jsonl'}]",
                 f"data.eval_files=[{expressions / 'eval.jsonl'}]", *steps(400)]) == 0
    assert main(["run", str(REPO / "examples/sft_lora.yaml"), "--output-dir", str(lora),
                 f"model.name_or_path={base / 'final'}", f"data.train_files=[{data / 'train.jsonl'}]",
                 f"data.eval_files=[{data / 'eval.jsonl'}]", *steps(200)]) == 0

    questions = data / "eval.jsonl"  # 30 questions LoRA never saw (the base knows their bare sums)
    before = held_out_exact_match(base / "final", questions)
    after = held_out_exact_match(lora / "final", questions)
    print(f"held-out exact match: base {before:.1%}, after LoRA {after:.1%}")
    assert after >= 0.8 and after >= before + 0.4
