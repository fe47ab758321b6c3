"""torchrun as llaunch starts it (launcher.runtime.torchrun), with real processes: what a user sees when a rank
explains its error, crashes, or torchrun is stopped by a signal."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.dist


def _launch(*rank_argv: str, nproc: int = 1) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "launcher.runtime.torchrun", "--standalone", "--nproc-per-node", str(nproc), *rank_argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def test_a_rank_that_explains_its_error_ends_the_launch_with_its_sentence_and_exit_2(tmp_path):
    done = _launch("-m", "launcher.train", "--job-dir", str(tmp_path / "missing"))
    assert done.returncode == 2
    assert "llaunch: error: plan file" in done.stderr
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr
    assert "exitcode" not in done.stderr


CRASH_ON_RANK_1 = """
import os, sys, time
import torch, torch.distributed as dist
dist.init_process_group("gloo")
dist.barrier()
if dist.get_rank() == 1:
    {crash}
while True:  # rank 0 waits for its peer: the crash reaches it as a collateral gloo error
    dist.all_reduce(torch.ones(1))
"""


@pytest.mark.parametrize("crash, how", [("raise RuntimeError('rank crashed')", "exited with code 1"),
                                        ("os._exit(3)", "exited with code 3"),
                                        ("os.kill(os.getpid(), 9)", "was killed by SIGKILL")])
def test_a_crashing_rank_ends_the_launch_in_one_sentence_naming_the_rank_that_failed_first(tmp_path, crash, how):
    """Not torchrun's ChildFailedError banner, and not the peer whose collective broke because of the crash."""
    script = tmp_path / "crash.py"
    script.write_text(CRASH_ON_RANK_1.format(crash=crash))
    done = _launch(str(script), nproc=2)
    assert done.returncode == 1, done.stderr[-4000:]
    assert done.stderr.strip().splitlines()[-1] == (f"llaunch: rank 1 failed first: it {how}; its error is in the "
                                                     f"output above, the other ranks were stopped.")
    assert "ChildFailedError" not in done.stderr and "exitcode" not in done.stderr


def test_sigterm_to_torchrun_is_one_line_not_its_signal_traceback(tmp_path):
    script = tmp_path / "sleep.py"
    script.write_text("import pathlib, sys, time\npathlib.Path(sys.argv[1]).touch()\ntime.sleep(60)\n")
    started = tmp_path / "started"
    proc = subprocess.Popen([sys.executable, "-m", "launcher.runtime.torchrun", "--standalone", "--nproc-per-node", "1",
                             str(script), str(started)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not started.exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-4000:]  # what torchrun said, when it did not end so
    assert "llaunch: stopped by SIGTERM" in err and "Traceback" not in err and "SignalException" not in err
