"""A preemption signal only sets a flag; a repeat after the duplicate window exits at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from launcher.errors import LaunchError
from launcher.train.preemption import DUPLICATE_WINDOW_S, PreemptionHandler, parse_signals, signal_ranks


def test_signal_sets_flag_and_training_continues():
    handler = PreemptionHandler(["SIGUSR1", "usr2"]).install()
    try:
        assert not handler.should_stop()
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR2)  # a duplicate (scheduler + torchrun) inside the window: no exit
        assert handler.should_stop() and handler.received == signal.SIGUSR2
    finally:
        handler.uninstall()
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL


def test_unknown_signal_name_is_refused():
    with pytest.raises(LaunchError, match="'SIGFOO' is not a signal name"):
        parse_signals(["SIGFOO"])


def test_second_signal_after_the_window_exits_at_once():
    script = textwrap.dedent(f"""
        import os, signal, time
        from launcher.train.preemption import PreemptionHandler
        PreemptionHandler().install()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep({DUPLICATE_WINDOW_S} + 0.3)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        print("still running")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 128 + signal.SIGTERM
    assert "still running" not in result.stdout


def test_launcher_sends_usr_signals_to_the_ranks_not_to_torchrun(tmp_path):
    """signal_ranks() reaches torchrun's children; torchrun (here a stand-in parent) is left alive."""
    marker = tmp_path / "rank-got-it"
    rank = (f"import signal, time, pathlib\n"
            f"signal.signal(signal.SIGUSR2, lambda *a: pathlib.Path({str(marker)!r}).write_text('ok'))\n"
            f"pathlib.Path({str(tmp_path / 'ready')!r}).write_text('1')\n"
            f"time.sleep(30)\n")
    parent = subprocess.Popen([sys.executable, "-c",
                               f"import subprocess, sys; subprocess.run([sys.executable, '-c', {rank!r}])"])
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "ready").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        signal_ranks(parent.pid, signal.SIGUSR2)
        while not marker.exists():
            assert time.monotonic() < deadline, "the rank never saw SIGUSR2"
            time.sleep(0.05)
        assert parent.poll() is None
    finally:
        import psutil

        for child in psutil.Process(parent.pid).children(recursive=True):
            child.kill()
        parent.kill()
        parent.wait()
