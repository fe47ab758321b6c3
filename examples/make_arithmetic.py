"""Data, random-init model and evaluator for the arithmetic fine-tuning example.

    python examples/make_arithmetic.py data --out runs/arith          # JSONL in two styles + a random-init model
    llaunch run examples/arith_base.yaml --output-dir runs/arith-base  # full FT: the base learns bare sums
    python examples/make_arithmetic.py eval --model runs/arith-base/final --data runs/arith/eval.jsonl
    llaunch run examples/sft_lora.yaml --output-dir runs/arith-lora    # LoRA: the base learns to answer questions
    python examples/make_arithmetic.py eval --model runs/arith-lora/final --data runs/arith/eval.jsonl

"What is 23 + 17?" -> "40": held-out exact-match accuracy before and after fine-tuning is a number, not a
loss. The same held-out problems are left out of both stages, so a gain means the model learned to add and
to answer, not that it saw the question.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="write {train,eval}.jsonl, expressions/{train,eval}.jsonl and init/ under --out")
    data.add_argument("--out", default="runs/arith")
    data.add_argument("--count", type=int, default=6000, help="distinct problems in all")
    data.add_argument("--eval-count", type=int, default=200)
    data.add_argument("--max-operand", type=int, default=99)
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--hidden-size", type=int, default=128, help="width of the random-init model")
    data.add_argument("--layers", type=int, default=4, help="decoder layers of the random-init model")
    ev = sub.add_parser("eval", help="held-out exact-match accuracy of a model or adapter directory")
    ev.add_argument("--model", required=True, help="a model directory, or an adapter directory (finds its base)")
    ev.add_argument("--data", required=True)
    ev.add_argument("--limit", type=int, default=None)
    args = parser.parse_args(argv)

    import arithmetic  # examples/arithmetic.py, beside this script

    if args.command == "data":
        from launcher.train.sft import format_prompt

        out = Path(args.out)
        problems = arithmetic.make_problems(args.count, args.seed, args.max_operand)
        texts = []
        for folder, style in ((out, "question"), (out / "expressions", "expression")):
            records = [arithmetic.as_record(problem, style) for problem in problems]
            arithmetic.write_jsonl(records[args.eval_count:], folder / "train.jsonl")
            arithmetic.write_jsonl(records[:args.eval_count], folder / "eval.jsonl")
            texts += [format_prompt(r["instruction"]) + r["output"] for r in records]
        arithmetic.make_base_model(out / "init", texts, hidden_size=args.hidden_size, layers=args.layers)
        print(f"{len(problems) - args.eval_count} train and {args.eval_count} held-out problems in {out} and "
              f"{out / 'expressions'}; random-init model in {out / 'init'}")
        return 0

    from launcher.train.adapters import load_for_generation

    model, tokenizer = load_for_generation(args.model)
    records = arithmetic.read_jsonl(args.data)[:args.limit]
    accuracy = arithmetic.exact_match(model, tokenizer, records)
    print(f"exact match on {len(records)} held-out questions: {accuracy:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
