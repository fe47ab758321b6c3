"""Progress beacons and the hang watchdog, in one process: timeouts by phase, attribution, configuration,
and stack dumps of a rank that stopped itself or holds the GIL."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.jobdir.layout import JobDir
from launcher.runtime.watchdog import Watchdog, WatchdogConfig, attribute, latest_hang
from launcher.runtime import beacon as beacon_module
from launcher.runtime.beacon import BeaconWriter, Phase, beacon_folder, beacon_path, read_beacon, read_beacons
from launcher.errors import LaunchError
from launcher.observe.event_ledger import read as ledger_events

REPO = Path(__file__).resolve().parents[2]
CONFIG = WatchdogConfig(poll_s=0.1, k=10.0, floor_s=2.0, first_step_s=50.0, checkpoint_s=300.0, grace_s=10.0)


def test_beacon_round_trip_and_phase_durations(tmp_path):
    writer = BeaconWriter(beacon_path(tmp_path, 3))
    assert read_beacon(beacon_path(tmp_path, 3), 3).phase == Phase.START
    writer.enter(Phase.DATA, 7)
    time.sleep(0.02)
    assert writer.enter(Phase.DATA) == 0.0  # the same phase of the same step is no boundary
    lasted = writer.enter(Phase.COMPUTE)
    beacon = read_beacons(tmp_path)[3]
    assert (beacon.step, beacon.phase, beacon.pid) == (7, Phase.COMPUTE, os.getpid())
    assert beacon.ended[Phase.DATA] == 1 and beacon.last_duration[Phase.DATA] == lasted >= 0.02
    assert beacon.age() < 1.0
    writer.close()


def test_a_beacon_folder_a_killed_launcher_left_is_removed_by_the_next_launch_and_no_other(tmp_path, monkeypatch):
    """SIGKILL gives a launcher no time to remove its folder; the next one removes it: only a folder llaunch made
    (it names its launcher) whose launcher is gone, not one of a live launcher, nor one of a reused pid's."""
    monkeypatch.setattr(beacon_module, "SHM", tmp_path / "no-shm")  # the folders go into the job dir
    gone = subprocess.run([sys.executable, "-c", "import os, psutil; p = psutil.Process(); "
                           "print(p.pid, repr(p.create_time()))"], capture_output=True, text=True, check=True)
    live = beacon_folder(tmp_path, "live")
    reused = tmp_path / "llaunch-beacons-reused"  # this very pid, but a process that started at another time
    for folder, owner in [(tmp_path / "llaunch-beacons-dead", gone.stdout.strip()), (reused, f"{os.getpid()} 1.0"),
                          (tmp_path / "llaunch-beacons-foreign", None)]:
        folder.mkdir()
        if owner is not None:
            (folder / "owner").write_text(owner)
    nexts = beacon_folder(tmp_path, "next")
    following = beacon_folder(tmp_path, "next")
    assert sorted(p.name for p in tmp_path.glob("llaunch-beacons-*")) == sorted([
        "llaunch-beacons-foreign", live.name, following.name, nexts.name])
    assert live.name.startswith("llaunch-beacons-live-") and len({live, following, nexts}) == 3  # one key, two folders


def test_a_torn_write_is_never_read(tmp_path):
    writer = BeaconWriter(beacon_path(tmp_path, 0))
    writer._slots[2] += 1  # SEQ odd: a write in progress
    assert read_beacon(beacon_path(tmp_path, 0), 0, attempts=3) is None
    writer._slots[2] += 1
    assert read_beacon(beacon_path(tmp_path, 0), 0) is not None
    writer.close()


def test_timeouts_first_step_then_floor_then_k_times_p99_and_checkpoints_their_own(tmp_path):
    writer = BeaconWriter(beacon_path(tmp_path, 0))
    dog = Watchdog(tmp_path, tmp_path, CONFIG, host="h0")
    assert dog.poll(now=writer.phase_start + 40) is None  # start-up: first_step_s
    writer.enter(Phase.DATA, 1)
    assert dog.poll(now=writer.phase_start + 40) is None  # the first step may take first_step_s
    for step in range(2, 5):
        for phase in (Phase.DATA, Phase.COMPUTE, Phase.SYNC):
            writer.enter(phase, step)
            dog.poll()
    slow_starter = BeaconWriter(beacon_path(tmp_path, 1))  # still compiling its first step: first_step_s
    dog.poll()
    slow_starter.enter(Phase.COMPUTE, 1)
    dog.poll()
    assert dog.timeout(read_beacons(tmp_path)[1]) == CONFIG.first_step_s
    slow_starter.close()
    beacon_path(tmp_path, 1).unlink()
    writer.enter(Phase.DATA, 5)
    assert dog.poll(now=writer.phase_start + 1.9) is None
    hang = dog.poll(now=writer.phase_start + 2.1)
    assert hang.stuck == (0,) and hang.timeouts == {0: 2.0}
    dog.durations[Phase.DATA].extend([0.5] * 100)  # slower steps: 10 x p99 = 5 s is above the floor
    assert dog.poll(now=writer.phase_start + 4.9) is None and dog.poll(now=writer.phase_start + 5.1) is not None
    writer.enter(Phase.SAVE)
    assert dog.poll(now=writer.phase_start + 299) is None and dog.poll(now=writer.phase_start + 301) is not None
    writer.enter(Phase.DONE)
    assert dog.poll(now=writer.phase_start + 1e6) is None
    writer.close()


def view(rank, step, phase, in_phase_s=5.0, host="h0"):
    return {"rank": rank, "host": host, "step": step, "phase": phase, "in_phase_s": in_phase_s}


@pytest.mark.parametrize("views, culprit, behind", [
    ([view(0, 4, "compute"), view(1, 4, "data")], 1, [1]),  # rank 0 waits in DDP's forward broadcast
    ([view(0, 4, "sync"), view(1, 4, "compute", host="h1"), view(2, 4, "sync")], 1, [1]),
    ([view(0, 5, "data"), view(1, 4, "save", 9.0), view(2, 4, "save", 2.0)], 1, [1, 2]),  # step lags
    ([view(0, 0, "load"), view(1, 6, "data")], 0, [0]),  # a resume still loading
    ([view(0, 4, "sync"), view(1, 4, "sync")], None, []),  # everyone waits: the cause is elsewhere
    ([view(0, 4, "data")], 0, [0]),  # a world of one
])
def test_attribution_names_the_rank_least_far_along(views, culprit, behind):
    result = attribute(views)
    assert (result["culprit"] or {}).get("rank") == culprit
    assert [b["rank"] for b in result["behind"]] == behind
    if culprit is not None:
        assert result["culprit"]["host"] == next(v["host"] for v in views if v["rank"] == culprit)


def test_config_from_env():
    assert WatchdogConfig.resolve({}) == WatchdogConfig()
    assert WatchdogConfig.resolve({"LLAUNCH_WATCHDOG": "floor_s=3, poll_s=0.5,window=9"}) == \
        WatchdogConfig(floor_s=3.0, poll_s=0.5, window=9)
    assert not WatchdogConfig.resolve({"LLAUNCH_WATCHDOG": "off"}).enabled
    for bad in ("floor=3", "floor_s=soon", "floor_s"):
        with pytest.raises(LaunchError, match="LLAUNCH_WATCHDOG entry"):
            WatchdogConfig.resolve({"LLAUNCH_WATCHDOG": bad})
    # 0 or less kills a healthy run as hung (poll_s=0 busy-loops), nan or inf never sees a hang
    for bad in ("poll_s=0", "floor_s=-1", "first_step_s=nan", "checkpoint_s=inf", "k=0", "window=-1", "grace_s=1e10"):
        with pytest.raises(LaunchError, match=f"LLAUNCH_WATCHDOG entry '{bad}' must be a positive number up to 1e9"):
            WatchdogConfig.resolve({"LLAUNCH_WATCHDOG": bad})


@pytest.mark.parametrize("how", ["sigstop", "spin"])
def test_stacks_of_a_rank_that_stopped_itself_or_holds_the_gil(tmp_path, how, monkeypatch):
    """faulthandler answers from C: a rank looping without yielding the GIL, or one stopped by SIGSTOP (the
    watchdog sends SIGCONT after the dump signal), still shows where it is."""
    monkeypatch.setattr("launcher.runtime.watchdog.shutil.which", lambda name: None)  # the faulthandler path
    script = ("import sys; from launcher.runtime.beacon import *; from launcher.train.faults import injected_hang; "
              "BeaconWriter(beacon_path(sys.argv[1], 0)).enter(Phase.DATA, 3); "
              "stacks = register_stack_dump(sys.argv[1], 0); injected_hang(sys.argv[2])")
    rank = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), how], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE, text=True)
    try:
        assert "fault injection: hang" in rank.stderr.readline()
        time.sleep(0.2)
        dog = Watchdog(tmp_path, tmp_path / "job", CONFIG, host="h0")
        hang = dog.poll(now=time.monotonic() + 100)
        folder = dog.respond(hang)
        stacks = (folder / "stacks-rank-0.txt").read_text()
        assert "in injected_hang" in stacks
        evidence = json.loads((folder / "evidence.json").read_text())
        assert evidence["stuck_ranks"] == [0] and evidence["ranks"][0]["step"] == 3
        assert folder.parent == JobDir(tmp_path / "job").hangs
    finally:
        rank.kill()
        rank.wait()


def test_another_node_asks_and_this_node_dumps_into_the_same_folder_even_with_a_hang_of_its_own(tmp_path):
    job = tmp_path / "job"
    first, second = (tmp_path / "n0", tmp_path / "n1")
    for folder, rank in ((first, 0), (second, 1)):
        folder.mkdir()
        BeaconWriter(beacon_path(folder, rank)).enter(Phase.SYNC if rank == 0 else Phase.DATA, 4)
    node0 = Watchdog(first, job, dataclasses.replace(CONFIG, grace_s=0.5), host="h0", nodes=2)
    node1 = Watchdog(second, job, CONFIG, host="h1", nodes=2)
    assert node1.requested_dump() is None
    folder = node0.respond(node0.poll(now=time.monotonic() + 100))
    assert node0.requested_dump() is None  # its own request
    own = node1.poll(now=time.monotonic() + 100)
    node1.poll = lambda: own  # h1 sees its rank stuck too (waiting for h0's): it still joins h0's folder
    assert own is not None and node1.check() == folder and node1.requested_dump() is None  # answered once
    assert [p.name for p in JobDir(job).hangs.iterdir()] == [folder.name]
    assert json.loads((folder / "beacons-h1.json").read_text())[0]["phase"] == "data"
    assert latest_hang(job) == f"hang: rank 0 on h0 is behind (the only rank, in sync of step 4); stacks and evidence in {folder}"
    assert json.loads((folder / "evidence.json").read_text())["nodes_answered"] == "1 of 2"  # h1 had not yet
    node0.write_evidence(node0.poll(now=time.monotonic() + 100), folder, {})
    evidence = json.loads((folder / "evidence.json").read_text())
    assert evidence["culprit"] == {"rank": 1, "host": "h1"} and evidence["nodes_answered"] == "2 of 2"


@pytest.mark.parametrize("apart_s", [0.0, 1.1], ids=["same second", "a second apart"])
def test_two_nodes_that_see_the_hang_at_once_each_get_the_others_beacons(tmp_path, apart_s):
    """Each detecting node opens a folder of its own, named by the second and its host: in the same second as
    well (the nodes' dump requests into one shared folder collided, and one node's supervisor died of it)."""
    import threading

    job = tmp_path / "job"
    dogs = []
    for rank, host in ((0, "h0"), (1, "h1")):
        (tmp_path / host).mkdir()
        BeaconWriter(beacon_path(tmp_path / host, rank)).enter(Phase.SYNC if rank == 0 else Phase.DATA, 4)
        dogs.append(Watchdog(tmp_path / host, job, dataclasses.replace(CONFIG, grace_s=3), host=host, nodes=2))
    hangs = [dog.poll(now=time.monotonic() + 100) for dog in dogs]
    first = threading.Thread(target=dogs[0].respond, args=(hangs[0],))
    first.start()
    time.sleep(apart_s)
    dogs[1].respond(hangs[1])
    first.join()
    assert len(list(JobDir(job).hangs.iterdir())) == 2
    records = [json.loads(path.read_text()) for path in sorted(JobDir(job).hangs.glob("*/evidence.json"))]
    assert [(r["nodes_answered"], r["culprit"]) for r in records] == [("2 of 2", {"rank": 1, "host": "h1"})] * 2


@pytest.mark.parametrize("max_requeues", [0, 1])
def test_node_task_kills_a_hung_rank_ledgers_the_culprit_and_requeues_without_its_host(tmp_path, monkeypatch,
                                                                                        max_requeues, slurm_node):
    """The node runtime under a SLURM node task without SLURM: a stand-in torchrun whose one rank hangs in its
    first step. Within --max-requeues the job is requeued (submitit's handler) and the culprit's host excluded."""
    from launcher.observe.node_ledger import NodeLedger

    rank = ("import os; from launcher.runtime.beacon import *; from launcher.train.faults import injected_hang; "
            "folder = os.environ['LLAUNCH_BEACON_DIR']; BeaconWriter(beacon_path(folder, 0)).enter(Phase.DATA, 1); "
            "stacks = register_stack_dump(folder, 0); injected_hang('sleep')")
    torchrun = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {rank!r}])"
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.delenv("LLAUNCH_WATCHDOG", raising=False)  # the node reads its settings from the job's config
    ledger = tmp_path / "ledger.jsonl"
    task = slurm_node(tmp_path, [sys.executable, "-c", torchrun], max_requeues=max_requeues,
                      node_ledger_path=str(ledger), min_nodes=1,  # the doctor has its own tests
                      watchdog={"poll_s": 0.2, "first_step_s": 1, "grace_s": 10})
    started = time.monotonic()
    if max_requeues:
        with pytest.raises(SystemExit):
            task()
    else:
        with pytest.raises(slurm_node.executor.TrainingError, match="job stopped by a hang and not requeued: already"):
            task()
    assert time.monotonic() - started < 30
    [event] = NodeLedger(ledger).events()
    assert (event.kind, event.host, event.job_id) == ("hang", "h0", "77")
    assert slurm_node.excluded == ([("77", ["h0"])] if max_requeues else [])
    [folder] = JobDir(tmp_path).hangs.iterdir()
    assert "in injected_hang" in (folder / "stacks-rank-0.txt").read_text()
    assert not list(tmp_path.glob("llaunch-beacons-*")) and not owned_beacon_folders(Path("/dev/shm"))
    ended = [e for e in ledger_events(tmp_path) if e["kind"] in ("exit", "requeue")]
    assert [e["kind"] for e in ended] == ["exit"] + ["requeue"] * max_requeues and ended[0]["cause"] == "hang"
    [hang] = [e for e in ledger_events(tmp_path) if e["kind"] == "hang"]  # goodput's hang time, in this attempt
    assert hang["inc"] == ended[0]["inc"] and hang["ranks"] == [0] and 1 <= hang["seconds"] < 30
    if max_requeues:
        assert ended[1]["reason"] == "hang on h0; requeue 1/1 resumes from the start (no checkpoint yet)"


def test_a_nodes_flagged_stragglers_reach_the_watchdog_through_their_beacons_and_go_into_the_ledger(tmp_path):
    """Each rank writes its own flag (every rank scores the window the same way); the watchdog sees this node's
    ranks only, and the node runtime records them as one soft event per launch."""
    from launcher.observe.node_ledger import NodeLedger
    from launcher.runtime.node import NodeOutcome, NodeRun, record_node_ledger

    writers = {rank: BeaconWriter(beacon_path(tmp_path, rank)) for rank in (2, 3)}  # this node runs ranks 2 and 3
    dog = Watchdog(tmp_path, tmp_path, CONFIG, host="n2")
    for step, flagged in ((40, set()), (50, {3})):
        for rank, writer in writers.items():
            writer.enter(Phase.SYNC, step)
            writer.report(busy_s=0.4 if rank in flagged else 0.1, flagged=rank in flagged)
    assert read_beacon(beacon_path(tmp_path, 3), 3).busy_s == 0.4
    assert dog.stragglers() == {3: 50}
    ledger = NodeLedger(tmp_path / "ledger.jsonl")
    launch = NodeRun(tmp_path, [], {}, "9.0", CONFIG, "9", host="n2")
    record_node_ledger(launch, NodeOutcome(0, None, None, dog.stragglers(), 0.0), ledger, "9")
    [event] = ledger.events()
    assert (event.host, event.kind, event.detail) == ("n2", "straggler", "rank(s) [3] flagged at step 50")
    writers[3].report(busy_s=0.1, flagged=False)  # cleared: no longer this node's straggler
    assert dog.stragglers() == {}


def test_a_launchs_first_step_is_timed_by_what_the_earlier_launch_into_the_job_dir_measured(tmp_path):
    """After a requeue the first step gets k x the longest its phase took before (at least floor_s), not
    first_step_s: a hang that recurs there is seen as fast as any other."""
    from launcher.runtime.watchdog import measured_phases

    job = tmp_path / "job"
    job.mkdir()
    before, after = tmp_path / "before", tmp_path / "after"
    for folder in (before, after):
        folder.mkdir()
    fresh = Watchdog(after, job, CONFIG, host="h0")
    writer = BeaconWriter(beacon_path(after, 0))
    writer.enter(Phase.DATA, 21)
    assert fresh.timeout(read_beacon(beacon_path(after, 0), 0)) == CONFIG.first_step_s  # nothing measured yet
    earlier = Watchdog(before, job, CONFIG, host="h1")
    first = BeaconWriter(beacon_path(before, 0))
    first.enter(Phase.DATA, 1)
    time.sleep(0.3)  # a slow first data phase (warm-up)
    first.enter(Phase.COMPUTE, 1)
    earlier.poll()
    earlier.close()
    JobDir(job).watchdog_phases("h2").write_text("{torn")  # another node's damaged record is skipped
    measured = measured_phases(job)["DATA"]
    assert 0.3 <= measured < 5
    requeued = Watchdog(after, job, CONFIG, host="h0")
    assert requeued.timeout(read_beacon(beacon_path(after, 0), 0)) == max(CONFIG.floor_s, CONFIG.k * measured)


def test_the_node_runtime_imports_neither_cluster_nor_torch():
    """`llaunch run` and the SLURM node task share launcher.runtime; cluster builds on it, never the other way
    (no package cycle), and the supervisor of the ranks loads no torch."""
    modules = "launcher.runtime.node, launcher.runtime.watchdog, launcher.runtime.rank_exits, launcher.observe.node_ledger"
    code = f"import sys, {modules}; print(sorted({{m.split('.')[0] for m in sys.modules}} & {{'cluster', 'torch'}}))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def owned_beacon_folders(root: Path) -> list[Path]:
    """The beacon folders this process made (a concurrent test's stand-in job 77 has its own)."""
    mine = []
    for folder in root.glob("llaunch-beacons-*"):
        try:
            if (folder / "owner").read_text().split()[0] == str(os.getpid()):
                mine.append(folder)
        except (OSError, IndexError):
            pass  # being made or removed by another test's launch
    return mine


def test_two_launches_with_one_key_never_share_a_beacon_folder(tmp_path):
    """Two launches can share a key (two clusters' jobs of one id on a node; stand-in job 77 in two tests at
    once): the first to end must not remove the folder the other's ranks still write their beacons into."""
    first = Watchdog.create(tmp_path / "a", "77-0", WatchdogConfig())
    second = Watchdog.create(tmp_path / "b", "77-0", WatchdogConfig())
    BeaconWriter(beacon_path(second.folder, 0)).enter(Phase.DATA)
    first.close()
    assert first.folder != second.folder and 0 in read_beacons(second.folder)
    second.close()
    assert not second.folder.exists()


def test_a_watchdog_that_first_polls_after_twenty_steps_times_the_rank_by_its_steps_not_first_step_s(tmp_path):
    """A loaded node's watchdog may read the beacons first when the rank is already past its checkpoint and
    hung at step 21: the rank's own phase counts say this is no first step, so the floor applies."""
    writer = BeaconWriter(beacon_path(tmp_path, 0))
    for step in range(1, 22):
        for phase in (Phase.DATA, Phase.COMPUTE, Phase.SYNC):
            writer.enter(phase, step)
    late = Watchdog(tmp_path, tmp_path, CONFIG, host="h0")
    assert late.poll(now=writer.phase_start + CONFIG.floor_s - 0.1) is None
    hang = late.poll(now=writer.phase_start + CONFIG.floor_s + 0.1)
    assert hang.stuck == (0,) and hang.timeouts == {0: CONFIG.floor_s}
    writer.close()
