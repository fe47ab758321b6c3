"""The first half of every "SIGTERM, then the same command again" test: a background `llaunch run` stopped with
SIGTERM, as `kill` or a scheduler would, once it has reached a given point; it must save a step and exit to be
requeued. tests/distributed/test_resume.py uses it; the tp, pp and ep tests stop their runs the same way."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from launcher.errors import REQUEUE_EXIT_CODE


def stop_with_sigterm(cmd: list[str], env: dict, log: Path, reached: Callable[[], bool], timeout: float = 300) -> int:
    """Run `cmd` in the background with its output in `log` (a pipe nobody reads would fill and block it), send it
    SIGTERM once `reached()` holds, and return the step it saved ("stopped by SIGTERM: saved step N")."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while not reached():
            assert proc.poll() is None, f"the run ended before the signal:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"not there after {timeout:g} s:\n{log.read_text()[-4000:]}"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert proc.returncode == REQUEUE_EXIT_CODE and "stopped by SIGTERM: saved step " in text, text[-4000:]
    return int(text.split("saved step ")[1].split(",")[0])


def checkpoint_published(step_dir: Path) -> Callable[[], bool]:
    """`reached` once the checkpoint's manifest is written (its shards are complete)."""
    return lambda: (step_dir / "manifest.json").exists()
