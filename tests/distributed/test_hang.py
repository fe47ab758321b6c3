"""`llaunch run` on 2 gloo ranks with injected faults: rank 1 is slow (+150 ms per step) and is flagged as a
straggler; then it hangs, and the launcher's watchdog catches it within its timeout + 2 polls, dumps both
ranks' stacks, names rank 1 and its host, kills the ranks and exits with the hang code; the checkpoint
written before stays complete. The same faults under a SLURM node task (in this process, without SLURM) leave
the same events and node-ledger entries: both go through launcher.runtime.node. One `llaunch run` serves both
tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from launcher.observe import goodput

from launcher.observe import event_ledger
from launcher.observe.node_ledger import NodeLedger
from launcher.errors import HANG_EXIT_CODE
from launcher.train.checkpoint import list_checkpoints
from tests.tiny_run import tiny_run_config

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[2]
POLL_S, FLOOR_S = 0.5, 3.0
FAULTS = "slow:rank=1,ms=150;hang:rank=1,step=7"
WATCHDOG = f"poll_s={POLL_S},floor_s={FLOOR_S},first_step_s=120,grace_s=10"


@pytest.fixture(scope="module")
def hung_run(tmp_path_factory) -> SimpleNamespace:
    """One `llaunch run` of 2 ranks with the faults, read by both tests (a launch costs a minute on a busy CI
    machine); its LLAUNCH_HOME is its own, so the local profile's node ledger holds this run's entries alone."""
    root = tmp_path_factory.mktemp("hang")
    config = tiny_run_config(root, training={"max_steps": 20, "save_steps": 2, "logging_steps": 1})
    config.write_text(config.read_text() + "parallel: {nproc_per_node: 2}\n")
    run = SimpleNamespace(config=config, out=root / "out", home=root / "home",
                          beacons_before=set(Path("/dev/shm").glob("llaunch-beacons-*")))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "LLAUNCH_FAULT": FAULTS,
           "LLAUNCH_WATCHDOG": WATCHDOG, "LLAUNCH_HOME": str(run.home)}
    started = time.monotonic()
    run.result = subprocess.run([sys.executable, "-m", "launcher", "run", str(config), "--output-dir", str(run.out)],
                                env=env, capture_output=True, text=True, timeout=300)
    run.took = time.monotonic() - started
    return run


def test_slow_then_hung_rank_is_flagged_caught_dumped_and_named(hung_run):
    out, result = hung_run.out, hung_run.result
    assert result.returncode == HANG_EXIT_CODE, result.stdout[-3000:] + result.stderr[-3000:]

    [folder] = (out / "hangs").iterdir()
    evidence = json.loads((folder / "evidence.json").read_text())
    host = socket.gethostname()
    assert evidence["culprit"] == {"rank": 1, "host": host} and evidence["why"].startswith("in data of step 7")
    assert f"rank 1 on {host} is behind" in result.stderr
    views = {v["rank"]: v for v in evidence["ranks"]}
    latency = max(views[rank]["in_phase_s"] for rank in evidence["stuck_ranks"])
    timeout = max(evidence["timeouts_s"].values())
    print(f"hang detected {latency:.2f} s after it began (timeout {timeout} s, poll {POLL_S} s); run took "
          f"{hung_run.took:.0f} s")
    assert timeout <= latency <= timeout + 2 * POLL_S
    assert "in injected_hang" in (folder / "stacks-rank-1.txt").read_text()
    report = goodput.analyse(event_ledger.read(out))  # the stall is goodput's hang time, not training
    assert abs(report.seconds["hang"] - latency) < 1.0, report.seconds
    assert "in train_step" in (folder / "stacks-rank-0.txt").read_text()

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 6 and records[-1]["stragglers"] == [1]
    assert all(0 not in r["stragglers"] for r in records)
    checkpoints = list_checkpoints(out, checksums=True)
    assert [c.step for c in checkpoints] == [2, 4, 6] and all(c.complete for c in checkpoints)
    # the launcher removed its own beacons
    assert not left_behind(set(Path("/dev/shm").glob("llaunch-beacons-*")) - hung_run.beacons_before)


def test_the_same_hang_leaves_the_same_records_under_llaunch_run_and_a_slurm_node_task(hung_run, tmp_path, monkeypatch,
                                                                                      slurm_node):
    """One node runtime: the local launch (hung_run) and the SLURM node task (one node, its host this machine's
    name) record the same event kinds in the job's ledger and the same node-ledger entries (the straggler, the
    hang's culprit)."""
    from cluster.profile import DEFAULT_PROFILE
    from launcher.jobdir.prepare import prepare_job, write_job

    for key, value in {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "LLAUNCH_FAULT": FAULTS,
                       "LLAUNCH_WATCHDOG": WATCHDOG, "LLAUNCH_HOME": str(hung_run.home)}.items():
        monkeypatch.setenv(key, value)
    local, slurm = hung_run.out, tmp_path / "slurm"
    assert hung_run.result.returncode == HANG_EXIT_CODE, hung_run.result.stdout[-3000:] + hung_run.result.stderr[-3000:]

    write_job(prepare_job(hung_run.config, output_dir=slurm, write=False))  # what `llaunch submit` writes
    task = slurm_node(slurm, host=socket.gethostname(), max_requeues=0, node_ledger_path=str(tmp_path / "slurm.jsonl"))
    with pytest.raises(slurm_node.executor.TrainingError, match="stopped by a hang and not requeued"):
        task()

    runs = {path: event_ledger.read(path) for path in (local, slurm)}
    kinds = {path: [e["kind"] for e in events] for path, events in runs.items()}
    assert kinds[local] == kinds[slurm] and kinds[local][0] == "launch" and kinds[local][-2:] == ["hang", "exit"], kinds
    for events in runs.values():
        assert 1 in events[-2]["ranks"] and events[-1]["cause"] == "hang"  # rank 0 may be over its timeout too
    ledgers = [NodeLedger.for_profile(DEFAULT_PROFILE), NodeLedger(tmp_path / "slurm.jsonl")]
    entries = [sorted((e.host, e.kind, e.detail) for e in ledger.events()) for ledger in ledgers]
    assert entries[0] == entries[1] and [kind for _, kind, _ in entries[0]] == ["hang", "straggler"], entries
    assert entries[0][0][0] == socket.gethostname() and entries[0][0][2].startswith("in data of step 7")


def left_behind(folders) -> list[Path]:
    """Beacon folders whose launcher has ended (a folder new since the test began may be another run's, under way)."""
    ended = []
    for folder in folders:
        try:
            pid = int((folder / "owner").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if not psutil.pid_exists(pid):
            ended.append(folder)
    return ended
