"""Data, base model and evaluator for the arithmetic LoRA example (examples/sft_lora.yaml).

    python examples/make_arithmetic.py data --out runs/arith      # train/eval JSONL + a tiny random-init base
    python examples/make_arithmetic.py eval --model runs/arith/base --data runs/arith/eval.jsonl
    python examples/make_arithmetic.py eval --model runs/arith-lora/final --data runs/arith/eval.jsonl

"What is 23 + 17?" -> "40": held-out exact-match accuracy before and after fine-tuning is a number, not a
loss. The eval split holds questions never seen in training, so a gain means the model learned to add.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="write train.jsonl, eval.jsonl and base/ under --out")
    data.add_argument("--out", default="runs/arith")
    data.add_argument("--count", type=int, default=1500, help="distinct questions in all")
    data.add_argument("--eval-count", type=int, default=200)
    data.add_argument("--max-operand", type=int, default=39)
    data.add_argument("--seed", type=int, default=0)
    ev = sub.add_parser("eval", help="held-out exact-match accuracy of a model or adapter directory")
    ev.add_argument("--model", required=True, help="a model directory, or an adapter directory (finds its base)")
    ev.add_argument("--data", required=True)
    ev.add_argument("--limit", type=int, default=None)
    args = parser.parse_args(argv)

    from launcher.train import arithmetic

    if args.command == "data":
        from launcher.train.sft import format_prompt

        out = Path(args.out)
        records = arithmetic.make_records(args.count, args.seed, args.max_operand)
        arithmetic.write_jsonl(records[args.eval_count:], out / "train.jsonl")
        arithmetic.write_jsonl(records[:args.eval_count], out / "eval.jsonl")
        texts = [format_prompt(None, r["instruction"]) + r["output"] for r in records]
        arithmetic.make_base_model(out / "base", texts)
        print(f"{len(records) - args.eval_count} train and {args.eval_count} eval questions, base model in {out / 'base'}")
        return 0

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher.train.adapters import base_model_path, is_adapter_dir, load_with_adapter

    if is_adapter_dir(args.model):
        model = load_with_adapter(base_model_path(args.model), args.model)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    records = arithmetic.read_jsonl(args.data)[:args.limit]
    accuracy = arithmetic.exact_match(model, tokenizer, records)
    print(f"exact match on {len(records)} held-out questions: {accuracy:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
