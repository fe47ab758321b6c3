"""No rank outlives `llaunch run`, however it ends: SIGKILL of the launcher, of its process group (a process
manager, the OOM killer) and of torchrun's agent alone with 2 ranks, SIGHUP with 1; and a real closed terminal
(`llaunch run` leads a session on a pty whose master is closed: SIGHUP from the kernel, then EIO for every
write to it), after which the ranks still save and stop instead of dying on a print.
10 s later no rank is alive, and the same command again resumes alone and ends with the weights of a run that
was never stopped; the killed launcher's beacon folder is gone by then. Where every process was SIGKILLed (the
launcher, its group), the run left no exit event: `llaunch goodput` counts it killed (test_goodput_run counts
its lost steps). Also SIGQUIT, and a hung rank with two SIGTERMs (the second kills torchrun; the hung rank goes
with it)."""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import psutil
import pytest

from launcher.observe import event_ledger
from launcher.runtime.beacon import BEACON_FOLDER_PREFIX, SHM
from launcher.errors import REQUEUE_EXIT_CODE
from tests.tiny_run import tiny_run_config

REPO = Path(__file__).resolve().parents[2]
SAVE_STEPS, MAX_STEPS = 4, 24
# Rank 0's steps take 100 ms longer (the same arithmetic, only slower): the run is still training when the
# test stops it after its first checkpoint.
SLOW = "slow:rank=0,ms=100"


class Terminal:
    """As a terminal runs a command: the command leads a session whose controlling terminal is a pty, and a
    thread copies what it shows into `log`; `close()` closes the pty's master, as closing the window does."""

    def __init__(self, command: list[str], env: dict, log: Path):
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(command, env=env, cwd=REPO, stdin=slave, stdout=slave, stderr=slave,
                                     start_new_session=True, preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        os.close(slave)
        self._closing = threading.Event()
        self._copier = threading.Thread(target=self._copy, args=(log,), daemon=True)
        self._copier.start()

    def _copy(self, log: Path) -> None:
        with open(log, "wb") as shown:
            while not self._closing.is_set():
                if select.select([self.master], [], [], 0.1)[0]:
                    try:
                        shown.write(os.read(self.master, 65536))
                    except OSError:  # EIO: every process let go of the terminal
                        return

    def close(self) -> None:
        self._closing.set()
        self._copier.join()  # no read may hold the master open: its last close is what hangs the terminal up
        os.close(self.master)


def llaunch_run(config: Path, out: Path, nproc: int, log: Path | None = None, env: dict | None = None,
                extra: tuple = (), terminal: bool = False):
    command = [sys.executable, "-m", "launcher", "run", str(config), "--output-dir", str(out),
               "--nproc-per-node", str(nproc), *extra]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    if log is None:
        return subprocess.run(command, env=full_env, cwd=REPO, capture_output=True, text=True, timeout=300)
    if terminal:
        return Terminal(command, full_env, log)
    # A session of its own, as a terminal gives a command: the process group the test kills holds the launcher only.
    return subprocess.Popen(command, env=full_env, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return tiny_run_config(tmp_path_factory.mktemp("tiny"), training={
        "max_steps": MAX_STEPS, "save_steps": SAVE_STEPS, "global_batch_size": 4, "logging_steps": 4,
        "report_to": []})


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory):
    """The uninterrupted run's final weights, per number of ranks, computed once."""
    runs = {}

    def get(nproc: int) -> Path:
        if nproc not in runs:
            out = tmp_path_factory.mktemp(f"straight-{nproc}") / "out"
            done = llaunch_run(config, out, nproc)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            runs[nproc] = out / "final" / "model.safetensors"
        return runs[nproc]

    return get


def alive(proc: psutil.Process) -> bool:
    """Running, as opposed to gone or a zombie waiting for a (container) init to reap it."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stop(target: str, launcher: subprocess.Popen, agent: psutil.Process, terminal: Terminal | None) -> None:
    if terminal is not None:
        terminal.close()
    elif target == "launcher":
        os.kill(launcher.pid, signal.SIGKILL)
    elif target == "process group":
        os.killpg(launcher.pid, signal.SIGKILL)
    elif target == "agent":
        agent.send_signal(signal.SIGKILL)
    elif target == "hung rank, two SIGTERMs":  # the hung rank never saves: the second one kills torchrun
        os.kill(launcher.pid, signal.SIGTERM)
        time.sleep(1)
        os.kill(launcher.pid, signal.SIGTERM)
    else:
        os.kill(launcher.pid, signal.Signals[target])


# (how the launcher is stopped, ranks, what the interrupted run gets besides the slow rank 0)
# Killing is tried with 2 ranks (each must go), a stop signal with 1 and 2 (a one-rank run is torchrun's too).
CASES = [(target, 2, "") for target in ("launcher", "process group", "agent")]
CASES += [("SIGHUP", 1, ""), ("SIGQUIT", 1, ""), ("hung rank, two SIGTERMs", 2, f";hang:rank=1,step={SAVE_STEPS + 2}"),
          ("closed terminal", 2, "")]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("target, nproc, fault", CASES, ids=[f"{t}-{n}" for t, n, _ in CASES])
def test_no_rank_outlives_its_launcher_and_the_rerun_resumes_alone_to_the_same_weights(tmp_path, config, reference,
                                                                                      target, nproc, fault, capsys):
    from safetensors.torch import load_file

    out, log = tmp_path / "out", tmp_path / "run.log"
    started = llaunch_run(config, out, nproc, log=log, env={"LLAUNCH_FAULT": SLOW + fault},
                          terminal=target == "closed terminal")
    terminal = started if isinstance(started, Terminal) else None
    launcher = terminal.proc if terminal else started
    try:
        deadline = time.monotonic() + 180
        while not (out / "checkpoints" / f"step-{SAVE_STEPS}" / "manifest.json").exists():
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        [agent] = psutil.Process(launcher.pid).children()
        ranks = agent.children()
        assert len(ranks) == nproc and all(f"--job-dir {out}" in " ".join(r.cmdline()) for r in ranks)
        stop(target, launcher, agent, terminal)
        code = launcher.wait(timeout=60)
        deadline = time.monotonic() + 10
        while any(map(alive, [agent, *ranks])) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(alive, [agent, *ranks])), f"alive 10 s after the {target} was stopped:\n" \
                                                     f"{log.read_text()[-3000:]}"
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for proc in psutil.Process().children(recursive=True):
            proc.kill()
    if target in ("SIGHUP", "SIGQUIT"):  # handled like SIGTERM: the ranks saved and stopped, asking to be rerun
        assert code == REQUEUE_EXIT_CODE and f"stopped by {target}: saved step" in log.read_text(), log.read_text()
    if terminal is not None:  # the same, though what they said could no longer be shown: the ledger tells
        ended = [(e["kind"], e.get("name") or e.get("cause")) for e in event_ledger.read(out)
                 if e["kind"] in (event_ledger.SIGNAL, event_ledger.TRAIN_END, event_ledger.EXIT)]
        assert code == REQUEUE_EXIT_CODE and ended == [("signal", "SIGHUP"), ("train_end", "preempted"),
                                                       ("exit", "SIGHUP")], (code, ended, log.read_text()[-3000:])

    killed = target in ("launcher", "process group")  # every process SIGKILLed: no exit event
    if killed:
        report = goodput_report(out, capsys)
        assert [i["cause"] for i in report["incarnations"]] == ["killed"] and report["failures"] == 1, report

    rerun = llaunch_run(config, out, nproc)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "resumed from" in rerun.stdout
    if killed:
        assert [i["cause"] for i in goodput_report(out, capsys)["incarnations"]] == ["killed", "finished"]
    final, straight = load_file(out / "final" / "model.safetensors"), load_file(reference(nproc))
    assert final.keys() == straight.keys() and all((final[k] - straight[k]).abs().max() <= 1e-6 for k in final)
    assert not (SHM / f"{BEACON_FOLDER_PREFIX}{launcher.pid}").exists()


def goodput_report(out: Path, capsys) -> dict:
    from launcher.cli import main

    capsys.readouterr()
    assert main(["goodput", str(out), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_finished_run_goes_on_when_asked_for_more_steps(tmp_path, config):
    """It used to be refused with "pass --overwrite", which then removed the run."""
    out = tmp_path / "out"
    first = llaunch_run(config, out, 1, extra=("--max-steps", str(MAX_STEPS // 2)))
    assert first.returncode == 0 and (out / "final").is_dir(), first.stdout[-3000:] + first.stderr[-3000:]
    more = llaunch_run(config, out, 1)
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    assert f"checkpoints/step-{MAX_STEPS // 2} at step {MAX_STEPS // 2}" in more.stdout
    assert (out / "checkpoints" / f"step-{MAX_STEPS}").is_dir()


def test_a_stop_signal_while_the_final_model_is_written_ends_a_finished_run(tmp_path, config):
    """SIGTERM after the last step: the final model is written, and the run is finished (exit 0, ledgered so),
    not a preemption to requeue. Rank 0 is held (SIGSTOP) after its loop ended while the signal goes round."""
    from launcher.observe import goodput
    from launcher.observe import event_ledger

    out, log = tmp_path / "out", tmp_path / "run.log"
    launcher = llaunch_run(config, out, 1, log=log)
    try:
        deadline = time.monotonic() + 180
        while not any(e["kind"] == event_ledger.TRAIN_END for e in event_ledger.read(out)):
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.002)
        [rank] = psutil.Process(launcher.pid).children()[0].children()
        rank.suspend()
        launcher.send_signal(signal.SIGTERM)
        time.sleep(2)  # the launcher passes it to torchrun, torchrun to the stopped rank
        rank.resume()
        assert launcher.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert (out / "final" / "model.safetensors").is_file()
    assert [inc.cause for inc in goodput.analyse(event_ledger.read(out)).incarnations] == ["finished"]
