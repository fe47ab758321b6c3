"""The launcher side's reader of the ranks' metrics file (launcher.train.metrics writes it): `llaunch status`
shows its newest step (and a sweep's table each element's newest evaluation), and the watchdog records the
stragglers it flagged last in the node ledger."""

from __future__ import annotations

from pathlib import Path

from launcher.files import read_records
from launcher.jobdir.layout import JobDir


def last_metrics(output_dir: str | Path) -> dict | None:
    """The newest line of the job dir's metrics file that has a training loss (a line still being written is
    not one yet: launcher.files.read_records)."""
    rows = read_records(JobDir(output_dir).metrics, _row)
    return next((row for row in reversed(rows) if "loss" in row and "step" in row), None)


def last_eval(output_dir: str | Path) -> dict | None:
    """The newest evaluation's row (step, eval_loss, ...): the one at the end of a finished run."""
    rows = read_records(JobDir(output_dir).metrics, _row)
    return next((row for row in reversed(rows) if "eval_loss" in row and "step" in row), None)


def _row(record: object) -> dict:
    if not isinstance(record, dict):
        raise ValueError("not a metrics row")
    return record
