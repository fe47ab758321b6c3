"""torchrun as llaunch starts it (launcher.torchrun), with real processes: what a user sees when a rank
explains its error, crashes, or torchrun is stopped by a signal."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.dist


def _launch(*rank_argv: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "launcher.torchrun", "--standalone", "--nproc-per-node", "1", *rank_argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def test_a_rank_that_explains_its_error_ends_the_launch_with_its_sentence_and_exit_2(tmp_path):
    done = _launch("-m", "launcher.train", "--job-dir", str(tmp_path / "missing"))
    assert done.returncode == 2
    assert "llaunch: error: plan file" in done.stderr
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr
    assert "exitcode" not in done.stderr


def test_a_crashing_rank_keeps_torchruns_failure_report(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text("raise RuntimeError('rank crashed')\n")
    done = _launch(str(script))
    assert done.returncode == 1
    assert "RuntimeError: rank crashed" in done.stderr and "ChildFailedError" in done.stderr


def test_sigterm_to_torchrun_is_one_line_not_its_signal_traceback(tmp_path):
    script = tmp_path / "sleep.py"
    script.write_text("import pathlib, sys, time\npathlib.Path(sys.argv[1]).touch()\ntime.sleep(60)\n")
    started = tmp_path / "started"
    proc = subprocess.Popen([sys.executable, "-m", "launcher.torchrun", "--standalone", "--nproc-per-node", "1",
                             str(script), str(started)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not started.exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-4000:]  # what torchrun said, when it did not end so
    assert "llaunch: stopped by SIGTERM" in err and "Traceback" not in err and "SignalException" not in err
