"""A preemption signal only sets a flag, and every copy of it is the same request; the node task's
handler only records, and it forwards to a rank once that rank can catch the signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager

import psutil
import pytest

from launcher.errors import LaunchError
from launcher.runtime.signals import StopSignals, catches, parse_signals
from launcher.train.preemption import PreemptionHandler


def test_signal_sets_flag_and_training_continues():
    handler = PreemptionHandler(["SIGUSR1", "usr2"]).install()
    try:
        assert not handler.should_stop()
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR2)  # a duplicate (SLURM + the node task): no exit
        assert handler.should_stop() and handler.received == signal.SIGUSR2
    finally:
        handler.uninstall()
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL


def test_unknown_signal_name_is_refused():
    with pytest.raises(LaunchError, match="'SIGFOO' is not a signal name"):
        parse_signals(["SIGFOO"])


def test_a_copy_seconds_later_is_the_same_request_not_an_exit():
    """SLURM's copy and the node task's forwarded one can arrive seconds apart under load."""
    script = textwrap.dedent("""
        import os, signal, time
        from launcher.runtime.signals import StopSignals
        handler = StopSignals().install()
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(1.5)
        os.kill(os.getpid(), signal.SIGUSR2)
        print("still running", handler.received.name)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "still running SIGUSR2" in result.stdout


def test_what_the_rank_caught_while_starting_reaches_the_trainers_handler():
    early = StopSignals().install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        handler = PreemptionHandler(["SIGUSR2", "SIGTERM"]).install()
        early.hand_over(handler)
        assert handler.received == signal.SIGTERM
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # not the trainer's: given back
        handler.uninstall()
    finally:
        early.uninstall()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_the_supervisors_handler_only_records_even_when_signals_come_in_quick_succession():
    """No import inside the handler (the node task's used to import torch there, and a second signal during that
    import failed the job with a partially initialized module)."""
    script = textwrap.dedent("""
        import os, signal, sys, time
        import cluster.executor
        from launcher.runtime.node import SignalLog
        signals = SignalLog().install()
        before = set(sys.modules)
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.5)
        print([int(s) for s in signals.received], sorted(set(sys.modules) - before), "torch" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [f"[{int(signal.SIGUSR2)},", f"{int(signal.SIGUSR2)}]", "[]", "False"]


@contextmanager
def stand_in_torchrun(rank_code: str):
    """A parent process (torchrun) running one child (its rank) with `rank_code`; both killed at the end."""
    parent = subprocess.Popen([sys.executable, "-c",
                               f"import subprocess, sys; subprocess.run([sys.executable, '-c', {rank_code!r}])"])
    try:
        yield parent
    finally:
        for child in psutil.Process(parent.pid).children(recursive=True):
            child.kill()
        parent.kill()
        parent.wait()


def wait_for(condition, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_the_supervisor_holds_a_signal_until_the_rank_catches_it_then_forwards_it_once(tmp_path):
    """A rank starts with SIG_IGN (inherited from torchrun): a signal sent then is lost, so the node runtime
    (`llaunch run` and the SLURM node task alike) waits until the rank's handler is installed; it forwards each
    signal to each rank only once, and not to torchrun (a stand-in parent here), which would die of SIGUSR2."""
    from launcher.runtime.node import SignalLog, _forward

    signals = SignalLog()
    signals.received.append(signal.SIGUSR2)

    log = tmp_path / "received"
    rank = (f"import signal, time\n"
            f"signal.signal(signal.SIGUSR2, signal.SIG_IGN)\n"
            f"time.sleep(1.0)\n"
            f"signal.signal(signal.SIGUSR2, lambda *a: open({str(log)!r}, 'a').write('x'))\n"
            f"time.sleep(30)\n")
    with stand_in_torchrun(rank) as parent:
        wait_for(lambda: psutil.Process(parent.pid).children(), "the rank to start")
        child = psutil.Process(parent.pid).children()[0].pid
        assert not catches(child, signal.SIGUSR2)
        forwarded: set = set()

        def forward() -> bool:
            _forward(parent.pid, signals, forwarded)
            return log.exists()

        wait_for(forward, "the rank to get SIGUSR2")
        for _ in range(10):
            _forward(parent.pid, signals, forwarded)
        time.sleep(0.3)
        assert catches(child, signal.SIGUSR2) and log.read_text() == "x" and parent.poll() is None


def test_a_write_to_a_terminal_that_is_gone_is_silenced_for_good_and_any_other_error_still_raises():
    """A reader gone (EPIPE; a hung-up terminal gives EIO the same way): the write that fails points the
    descriptor at /dev/null, so it and every later write succeed; a full disk still raises."""
    import errno
    import io

    from launcher.runtime.terminal import TerminalSafeStream

    read_end, write_end = os.pipe()
    os.close(read_end)
    stream = TerminalSafeStream(io.TextIOWrapper(io.FileIO(write_end, "w"), line_buffering=True))
    previous = signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as Python sets it: EPIPE, not death by SIGPIPE
    try:
        assert stream.write("stopped by SIGHUP: saved step 5\n") == len("stopped by SIGHUP: saved step 5\n")
        stream.flush()
        assert os.path.samefile(f"/proc/self/fd/{write_end}", os.devnull)
        print("and later lines too", file=stream, flush=True)
    finally:
        signal.signal(signal.SIGPIPE, previous)
        stream.close()

    class FullDisk(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        TerminalSafeStream(FullDisk()).write("x")
