"""The launcher side's reader of the ranks' metrics file (launcher.train.metrics writes it): `llaunch status`
shows its newest step, and the watchdog records the stragglers it flagged last in the node ledger."""

from __future__ import annotations

import json
from pathlib import Path

from launcher.jobdir.layout import JobDir


def last_metrics(output_dir: str | Path) -> dict | None:
    """The newest line of the job dir's metrics file that has a training loss."""
    path = JobDir(output_dir).metrics
    if not path.exists():
        return None
    for line in reversed(path.read_text().splitlines()):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line still being written
        if isinstance(row, dict) and "loss" in row and "step" in row:
            return row
    return None
