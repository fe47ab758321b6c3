"""SaveCadence in one process: the interval becomes a save step, a failed interval save is reported and training
goes on, and auto takes C, R and the failures from the ledgers (this job's and the cluster's earlier ones)."""

from __future__ import annotations

import json
import os

import pytest

from launcher.observe import goodput

from launcher.observe import history

from launcher.observe import event_ledger
from launcher.jobdir.layout import JobDir
from launcher.config import TrainingSection
from launcher.errors import LaunchError
from launcher.train import cadence as cadence_module
from launcher.train.cadence import SaveCadence


class Clock:
    def __init__(self):
        self.now = 1000.0

    def time(self):
        return self.now


@pytest.fixture
def clock(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAUNCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SLURM_CLUSTER_NAME", raising=False)
    fake = Clock()
    monkeypatch.setattr(cadence_module.time, "time", fake.time)
    return fake


def run_steps(cadence, clock, steps, save, step_s=0.5):
    for step in range(1, steps + 1):
        clock.now += step_s
        cadence.step_end(step, save, wait=lambda: None)


def test_save_interval_s_becomes_a_step_and_saves_come_every_interval(tmp_path, clock):
    saved = []
    cadence = SaveCadence(tmp_path, TrainingSection(save_interval_s=2.0), 0, 1, event_ledger.RankLedger(tmp_path, 0))
    run_steps(cadence, clock, 20, save=lambda: saved.append(cadence.next_step))
    assert saved == [6, 10, 14, 18]  # planned at step 2 from one 0.5 s step: every 4 steps
    assert [e["kind"] for e in event_ledger.read(tmp_path)] == ["cadence"]  # the unchanged interval is logged once


def test_a_failed_save_is_reported_and_tried_again_one_interval_later(tmp_path, clock, capsys):
    attempts = []

    def failing_save():
        attempts.append(cadence.next_step)
        raise LaunchError("could not write checkpoint step-6 (No space left on device)")

    cadence = SaveCadence(tmp_path, TrainingSection(save_interval_s=2.0), 0, 1, event_ledger.RankLedger(tmp_path, 0))
    run_steps(cadence, clock, 11, save=failing_save)
    assert attempts == [6, 10]
    assert "checkpoint at step 6 failed (could not write checkpoint step-6 (No space left on device)); training " \
           "goes on and tries again at step 10" in capsys.readouterr().out
    failed = [e for e in event_ledger.read(tmp_path) if e["kind"] == "save"]
    assert [(e["step"], e["ok"]) for e in failed] == [(6, False), (10, False)]


def test_auto_plans_from_measured_save_cost_restart_cost_and_failures(tmp_path, clock, capsys):
    other = tmp_path / "earlier"  # an earlier job on this cluster: 2 failures in 90 s running on 1 node
    other.mkdir()
    for t, kind, fields in ((0, "launch", {}), (40, "exit", {"cause": "failed"}), (50, "launch", {}),
                            (100, "exit", {"cause": "failed"})):
        event_ledger.append(other, kind, t=t, inc=str(t // 50), **fields)
    history.register(other)  # as its launcher did
    job = tmp_path / "job"
    job.mkdir()
    event_ledger.append(job, event_ledger.LAUNCH, t=clock.now - 10, inc="a")
    event_ledger.append(job, event_ledger.FIRST_STEP, t=clock.now, inc="a", step=1)  # a start cost 10 s
    saves = []
    cadence = SaveCadence(job, TrainingSection(save_strategy="auto"), 0, 1, event_ledger.RankLedger(job, 0))

    def save():
        clock.now += 0.4  # a blocking save of 0.4 s
        saves.append(cadence.next_step)

    run_steps(cadence, clock, 60, save=save)
    out = capsys.readouterr().out
    assert "first checkpoint after 10.0 s, what a start costs (no save measured yet)" in out
    plans = [e for e in event_ledger.read(job) if e["kind"] == "cadence"]
    auto = plans[-1]
    assert auto["save_cost_s"] == pytest.approx(0.4) and auto["restart_cost_s"] == pytest.approx(10, abs=1)
    assert "2 in 0.025 node-hours of earlier jobs" in auto["mtbf_source"]
    assert auto["optimal_s"] == pytest.approx(goodput.availability_optimal_interval(0.4, auto["restart_cost_s"],
                                                                                     auto["mtbf_s"]))
    assert auto["optimal_s"] < 8 and auto["interval_s"] == pytest.approx(8)  # 0.4 s saves at most 5 % of the time
    assert saves[0] == 22 and saves[1] - saves[0] == round(auto["interval_s"] / 0.5)


def write_long_ledger(job, now: float, windows: int) -> None:
    """A long job's ledger: one incarnation that trained `windows` step windows and failed, then the one that
    is starting now (written at once: appending them one by one would fsync each)."""
    events = [{"t": 0.0, "kind": "launch", "inc": "a"}, {"t": 10.0, "kind": "first_step", "inc": "a", "step": 1}]
    events += [{"t": 10.0 + i, "kind": "steps", "inc": "a", "step": 1 + i, "tokens": 64 * i} for i in range(1, windows)]
    events += [{"t": 10.0 + windows, "kind": "exit", "inc": "a", "code": 1, "cause": "failed"},
               {"t": now - 10, "kind": "launch", "inc": "b"}, {"t": now, "kind": "first_step", "inc": "b", "step": 1}]
    JobDir(job).events.write_text("".join(json.dumps(e) + "\n" for e in events))


def test_auto_reads_the_ledger_once_per_incarnation_so_every_save_costs_what_the_first_did(tmp_path, clock,
                                                                                          monkeypatch):
    job = tmp_path / "job"
    job.mkdir()
    write_long_ledger(job, clock.now, windows=5_000)
    size = JobDir(job).events.stat().st_size
    bytes_read, planned = [], []
    read, plan = event_ledger.read_records, goodput.plan_interval
    monkeypatch.setattr(event_ledger, "read_records", lambda path, check: bytes_read.append(path.stat().st_size) or
                        read(path, check))
    monkeypatch.setattr(goodput, "plan_interval", lambda *args: planned.append((clock.now, args[3])) or plan(*args))
    saves = []
    cadence = SaveCadence(job, TrainingSection(save_strategy="auto"), 0, 1, event_ledger.RankLedger(job, 0))
    run_steps(cadence, clock, 400, save=lambda: saves.append(cadence.next_step))
    assert len(saves) > 20 and bytes_read == [size]  # once, not once per save
    (first_at, first_running), (last_at, last_running) = planned[0], planned[-1]
    whole = goodput.analyse(event_ledger.read(job))  # read again for the check: what the cadence started from
    assert first_running == pytest.approx(whole.running_s, abs=1.0)  # the first step, before the first plan
    assert last_running - first_running == pytest.approx(last_at - first_at)  # running since, in memory


def add_line(path, line: str) -> None:
    with path.open("a") as handle:
        handle.write(line + "\n")


def replace(path, make) -> None:
    path.unlink()
    make(path)


LEDGER = JobDir(".").events.name
# (what is broken, how) before an auto run's first plan: none of them may stop it from saving
BROKEN_LEDGERS = [
    ("this job's ledger has a wrong-typed line",
     lambda job, other: add_line(job / LEDGER, '{"t": 999, "kind": "save", "seconds": "slow"}'), "damaged line"),
    ("an earlier job's ledger has a wrong-typed line",
     lambda job, other: add_line(other / LEDGER, '{"t": 60, "kind": "restore", "step": "x"}'), "damaged line"),
    ("an earlier job's ledger is a FIFO", lambda job, other: replace(other / LEDGER, os.mkfifo), "not a regular"),
    ("an earlier job's ledger is a directory", lambda job, other: replace(other / LEDGER, os.mkdir), "not a regular"),
    ("this job's ledger is a FIFO", lambda job, other: replace(job / LEDGER, os.mkfifo), "not a regular file"),
    ("the cluster's list of jobs is a FIFO",
     lambda job, other: replace(history.history_file(), os.mkfifo), "not a regular file"),
]


@pytest.mark.parametrize("what, damage, warning", BROKEN_LEDGERS, ids=[what for what, _, _ in BROKEN_LEDGERS])
@pytest.mark.timeout(60)
def test_a_damaged_ledger_never_stops_auto_from_saving(tmp_path, clock, capsys, what, damage, warning):
    other = tmp_path / "earlier"
    other.mkdir()
    for t, kind, fields in ((0, "launch", {}), (40, "exit", {"cause": "failed"})):
        event_ledger.append(other, kind, t=t, inc="x", **fields)
    history.register(other)  # as its launcher did
    job = tmp_path / "job"
    job.mkdir()
    event_ledger.append(job, event_ledger.LAUNCH, t=clock.now - 10, inc="a")
    event_ledger.append(job, event_ledger.FIRST_STEP, t=clock.now, inc="a", step=1)
    damage(job, other)
    saves = []
    cadence = SaveCadence(job, TrainingSection(save_strategy="auto"), 0, 1, event_ledger.RankLedger(job, 0))
    run_steps(cadence, clock, 60, save=lambda: saves.append(cadence.next_step))
    assert len(saves) >= 2
    assert warning in capsys.readouterr().err


def test_an_async_save_records_its_background_time_once_published(tmp_path):
    import concurrent.futures

    from launcher.train.checkpoint import Checkpointer

    class AsyncEngine:
        def save_state(self, directory, async_save=False):
            directory.mkdir(parents=True)
            (directory / "shard").write_bytes(b"x" * 10)
            done = concurrent.futures.Future()
            done.set_result(None)
            return done if async_save else None

    checkpointer = Checkpointer(tmp_path, strategy="ddp", async_save=True)
    checkpointer.save(3, AsyncEngine(), {"train_state": {}})
    checkpointer.wait()
    (background,) = [e for e in event_ledger.read(tmp_path) if e["kind"] == event_ledger.SAVE_BACKGROUND]
    assert background["step"] == 3 and background["seconds"] >= 0
    assert (tmp_path / "checkpoints" / "step-3" / "manifest.json").exists()


def test_a_rank_under_auto_only_reads_the_clusters_history_and_the_launcher_registers_the_job_once(tmp_path, clock):
    job = tmp_path / "job"
    job.mkdir()
    event_ledger.append(job, event_ledger.LAUNCH, t=clock.now - 10, inc="a")
    event_ledger.append(job, event_ledger.FIRST_STEP, t=clock.now, inc="a", step=1)
    cadence = SaveCadence(job, TrainingSection(save_strategy="auto"), 0, 1, event_ledger.RankLedger(job, 0))
    run_steps(cadence, clock, 30, save=lambda: None)
    assert cadence.history == (0.0, 0) and not (tmp_path / "home").exists()  # nothing written outside the job dir
    history.register(job)
    history.register(job)
    assert history.history_file().read_text().splitlines() == [str(job.resolve())]
