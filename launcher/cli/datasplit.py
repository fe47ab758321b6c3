"""`llaunch datasplit IN --train-output A --eval-output B --eval-percentage 10 --seed S`: hold out an eval set.

Lines (JSONL records) are shuffled with the seed and cut, so the same seed always gives the same split and
the two outputs never share a line. Blank lines are dropped; records are copied byte for byte.
"""

from __future__ import annotations

import random
from pathlib import Path

from launcher.errors import LaunchError
from launcher.files import check_file_target, write_files_atomic


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
    outputs = {"--train-output": Path(args.train_output), "--eval-output": Path(args.eval_output)}
    for flag, path in outputs.items():
        if _same_file(path, source):
            raise LaunchError(f"{flag} {path} is the input file; write the split to new files.")
    if _same_file(*outputs.values()):
        raise LaunchError(f"--train-output and --eval-output are both {args.train_output}; give two different files.")
    try:
        text = source.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise LaunchError(f"{source} is not UTF-8 text (byte {err.start}); pass a JSONL file.") from None
    # JSONL is split on newlines only: str.splitlines would also cut a record at a raw U+2028 inside a string.
    lines = [line + "\n" for line in text.split("\n") if line.strip()]
    if any("\x00" in line for line in lines):
        raise LaunchError(f"{source} holds NUL bytes, so it is binary, not JSONL; pass a JSONL file.")
    train, held = split_lines(lines, args.eval_percentage, args.seed)
    for flag, path in outputs.items():  # both outputs can be written before either is
        check_file_target(path, flag)
    write_files_atomic({outputs["--train-output"]: "".join(train).encode("utf-8"),
                        outputs["--eval-output"]: "".join(held).encode("utf-8")})
    print(f"{len(train)} train records -> {args.train_output}; {len(held)} eval records -> {args.eval_output}")
    return 0


def _same_file(a: Path, b: Path) -> bool:
    """The same file by path (resolved, links followed) or, when both exist, by inode (hard links)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False
