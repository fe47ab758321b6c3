"""The arithmetic fine-tuning example exactly as shipped (examples/arith_base.yaml, then examples/sft_lora.yaml):
LoRA must raise held-out exact match clearly above the base model's, on CPU, in minutes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from launcher.cli import main
from launcher.train import arithmetic
from launcher.train.adapters import load_for_generation

REPO = Path(__file__).resolve().parents[2]


def held_out_exact_match(model_dir: Path, eval_file: Path) -> float:
    model, tokenizer = load_for_generation(model_dir)
    return arithmetic.exact_match(model, tokenizer, arithmetic.read_jsonl(eval_file))


def test_lora_example_lifts_held_out_exact_match_far_above_the_base(tmp_path):
    data = tmp_path / "arith"
    subprocess.run([sys.executable, str(REPO / "examples/make_arithmetic.py"), "data", "--out", str(data)],
                   check=True, cwd=REPO)
    base, lora = tmp_path / "arith-base", tmp_path / "arith-lora"
    assert main(["run", str(REPO / "examples/arith_base.yaml"), "--output-dir", str(base),
                 f"model.name_or_path={data / 'init'}", f"data.train_files=[{data / 'expressions/train.jsonl'}]",
                 f"data.eval_files=[{data / 'expressions/eval.jsonl'}]"]) == 0
    assert main(["run", str(REPO / "examples/sft_lora.yaml"), "--output-dir", str(lora),
                 f"model.name_or_path={base / 'final'}", f"data.train_files=[{data / 'train.jsonl'}]",
                 f"data.eval_files=[{data / 'eval.jsonl'}]"]) == 0

    questions = data / "eval.jsonl"  # 200 problems left out of both stages
    before = held_out_exact_match(base / "final", questions)
    after = held_out_exact_match(lora / "final", questions)
    print(f"held-out exact match: base {before:.1%}, after LoRA {after:.1%}")
    assert before <= 0.10
    assert after >= before + 0.20
