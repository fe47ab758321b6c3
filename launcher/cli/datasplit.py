"""`llaunch datasplit IN --train-output A --eval-output B --eval-percentage 10 --seed S`: hold out an eval set.

Lines (JSONL records) are shuffled with the seed and cut, so the same seed always gives the same split and
the two outputs never share a line. Blank lines are dropped; records are copied byte for byte.
"""

from __future__ import annotations

import random
from pathlib import Path

from launcher.errors import LaunchError
from launcher.files import write_text_atomic


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("datasplit", help="split a JSONL file into train and eval files (seeded)")
    p.add_argument("input", help="JSONL file, one record per line")
    p.add_argument("--train-output", required=True)
    p.add_argument("--eval-output", required=True)
    p.add_argument("--eval-percentage", type=float, default=10.0, help="share of lines held out (default 10)")
    p.add_argument("--seed", type=int, default=42)
    p.set_defaults(run=run)


def split_lines(lines: list[str], eval_percentage: float, seed: int) -> tuple[list[str], list[str]]:
    if not 0 < eval_percentage < 100:
        raise LaunchError(f"--eval-percentage {eval_percentage} must be between 0 and 100 (exclusive).")
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(lines) * eval_percentage / 100))
    if n_eval >= len(lines):
        raise LaunchError(f"{len(lines)} records cannot give both a train and an eval split; add data.")
    held = set(order[:n_eval])
    # Both outputs keep the input's order, so diffs against the source stay readable.
    return ([l for i, l in enumerate(lines) if i not in held], [l for i, l in enumerate(lines) if i in held])


def run(args) -> int:
    source = Path(args.input)
    if not source.is_file():
        raise LaunchError(f"input file {source} does not exist; pass a JSONL file.")
    lines = [line if line.endswith("\n") else line + "\n"
             for line in source.read_text(encoding="utf-8").splitlines(keepends=True) if line.strip()]
    train, held = split_lines(lines, args.eval_percentage, args.seed)
    for path, part in ((args.train_output, train), (args.eval_output, held)):
        write_text_atomic(path, "".join(part))
    print(f"{len(train)} train records -> {args.train_output}; {len(held)} eval records -> {args.eval_output}")
    return 0
