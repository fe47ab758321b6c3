"""A rank that dies without a sentence on SLURM (the OOM killer, a lost GPU): the node runtime names the rank that
failed first, records only its host in the node ledger and requeues within --max-requeues; what is the job's
(a rank's LaunchError, a taken port, a full shared dir, a cancel during the doctor) blames no node."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from cluster.doctor.checks import FAIL, OK, Check
from cluster.doctor.node import NodeReport
from cluster.jobs import last_error
from launcher.observe.node_ledger import NodeLedger
from launcher.runtime.rank_exits import RankExit, first_failure, judge, latest_failure
from launcher.observe.event_ledger import read as ledger_events
from launcher.runtime.node import NodeOutcome, NodeRun, SignalLog, record_node_ledger
from launcher.errors import HANG_EXIT_CODE
from launcher.runtime.watchdog_config import WatchdogConfig

REPO = Path(__file__).resolve().parents[2]
# A stand-in torchrun with two ranks on this node: rank 1 is SIGKILLed (as by the OOM killer) after a moment,
# rank 0 fails a second later (its peer's collateral error), torchrun exits 1 as torchrun does.
RANKS = """
import os, signal, subprocess, sys, time
kill = "import os, signal, time; time.sleep(1.0); os.kill(os.getpid(), signal.SIGKILL)"
collateral = "import sys, time; time.sleep(2.5); sys.exit(int(sys.argv[1]))"
ranks = [subprocess.Popen([sys.executable, "-c", collateral, sys.argv[1]], env={**os.environ, "RANK": "0"}),
         subprocess.Popen([sys.executable, "-c", kill], env={**os.environ, "RANK": "1"})]
codes = [rank.wait() for rank in ranks]
sys.exit(int(sys.argv[1]) if any(codes) else 0)
"""


@pytest.mark.parametrize("max_requeues", [0, 1])
def test_a_killed_rank_requeues_the_job_and_blames_the_node_of_the_rank_that_failed_first(
        tmp_path, monkeypatch, max_requeues, slurm_node):
    monkeypatch.setenv("LLAUNCH_WATCHDOG", "off")
    task = slurm_node(tmp_path, [sys.executable, "-c", RANKS, "1"], max_requeues=max_requeues,
                      node_ledger_path=str(tmp_path / "ledger.jsonl"))
    if max_requeues:
        with pytest.raises(SystemExit):
            task()
    else:
        with pytest.raises(slurm_node.executor.TrainingError, match="stopped by a node failure and not requeued: "
                                                                   "already"):
            task()
    [event] = NodeLedger(tmp_path / "ledger.jsonl").events()
    assert (event.kind, event.host, event.job_id, event.detail) == ("rank_failed", "h0", "77", "rank 1 on h0 failed first")
    assert latest_failure(tmp_path) == "attempt 1: rank 1 on h0 failed first; the other ranks' errors followed from it"
    requeues = [e for e in ledger_events(tmp_path) if e["kind"] == "requeue"]
    assert [e["reason"] for e in requeues] == [
        "rank 1 on h0 failed first; requeue 1/1 resumes from the start (no checkpoint yet)"][:max_requeues]


def test_a_rank_that_said_why_ends_the_job_without_a_requeue_or_a_node_event(tmp_path, monkeypatch, slurm_node):
    monkeypatch.setenv("LLAUNCH_WATCHDOG", "off")
    task = slurm_node(tmp_path, [sys.executable, "-c", RANKS, "2"], max_requeues=3,  # a LaunchError's exit code
                      node_ledger_path=str(tmp_path / "ledger.jsonl"))
    with pytest.raises(slurm_node.executor.TrainingError, match="torchrun exited with code 2"):
        task()
    assert NodeLedger(tmp_path / "ledger.jsonl").events() == []


def test_the_rank_that_ended_first_is_the_one_that_failed_first():
    def ended(rank, t):
        return RankExit(rank, f"n{rank}", rank, t)

    assert first_failure([ended(0, 12.0), ended(1, 10.5), ended(2, 11.0)]) == ended(1, 10.5)
    assert first_failure([ended(0, 10.0), ended(1, 10.0)]) is None  # a tie says nothing
    assert first_failure([]) is None
    assert first_failure([ended(3, 1.0)]) == ended(3, 1.0)


@pytest.mark.parametrize("failed, blamed", [
    (["rendezvous", "allreduce"], None),  # port taken on the first node: the job's, and every node's all-reduce fails
    (["space"], None),  # too little space on the shared dir
    (["allreduce"], None),  # which side of the pair is at fault is unknown
    (["software"], "software"), (["gpus"], "gpus"), (["storage"], "storage"),
])
def test_only_a_check_about_the_host_itself_blames_it(failed, blamed):
    checks = [Check(name, FAIL if name in failed else OK, "why") for name in
              ("rendezvous", "storage", "software", "space", "gpus", "allreduce")]
    fault = NodeReport(1, "n2", "9", checks=checks).host_fault
    assert (fault.name if fault else None) == blamed


def doctor_part_of_attempt(task, job_env, signals: SignalLog, hosts=("n1", "n2")) -> str:
    """The doctor's part of NodeTask._attempt where a node failed it: preflight, then what the attempt ends with."""
    report = task._preflight(job_env, list(hosts), signals)
    assert report.stops_torchrun
    return task._after_doctor_failure(report, job_env, list(hosts), signals)


@pytest.mark.parametrize("received", [[], [signal.SIGTERM]])
def test_a_doctor_failure_is_a_node_event_only_when_it_is_the_hosts_and_not_during_a_cancel(
        tmp_path, monkeypatch, received):
    from cluster import executor

    reports = {"n1": NodeReport(0, "n1", "9", checks=[Check("rendezvous", FAIL, "port 20009 is taken")]),
               "n2": NodeReport(1, "n2", "9", checks=[Check("software", FAIL, "torch 0.0.0 here")])}
    ledger = tmp_path / "ledger.jsonl"
    task = executor.NodeTask(str(tmp_path), 3, 0, 60, node_ledger_path=str(ledger))
    signals = SignalLog()
    signals.received.extend(received)
    monkeypatch.setattr(executor, "node_address", lambda node: node)
    for node, host in enumerate(("n1", "n2")):
        monkeypatch.setattr(executor, "preflight", lambda *a, host=host: reports[host])
        with pytest.raises(executor.TrainingError, match="during the doctor" if received else f"failed on {host}"):
            doctor_part_of_attempt(task, SimpleNamespace(node=node, job_id="9", global_rank=node), signals)
    assert [(e.kind, e.host) for e in NodeLedger(ledger).events()] == ([] if received else [("doctor", "n2")])


def test_status_names_the_failing_ranks_error_not_its_peers_collateral(tmp_path):
    failing, peer = tmp_path / "78_1_log.err", tmp_path / "78_0_log.err"
    failing.write_text("[llaunch] attempt 1\nValueError: a real bug on rank 1\n")
    peer.write_text("[llaunch] attempt 1\n"
                    "torch.distributed.DistNetworkError: Connection closed by peer [127.0.0.1]:43120\n"
                    "RuntimeError: [pair.cc:534] Connection closed by peer [127.0.0.1]:43121\n")
    import os

    os.utime(failing, (1, 1))  # the peer's log was written last
    assert last_error([failing, peer]) == "ValueError: a real bug on rank 1"


def test_rank_exits_records_are_read_back_and_a_damaged_one_is_skipped(tmp_path):
    folder = tmp_path / "rank-exits" / "5.1"
    folder.mkdir(parents=True)
    (folder / "node-0.json").write_text(json.dumps([{"rank": 0, "host": "n1", "node": 0, "ended_t": 20.0}]))
    (folder / "node-1.json").write_text(json.dumps([{"rank": 1, "host": "n2", "node": 1, "ended_t": 19.0}]))
    (folder / "node-2.json").write_text("{torn")
    assert judge(tmp_path, "5.1", ["n1", "n2", "n3"], task_died=False, wait_s=0) == ("n2", "rank 1 on n2 failed first")
    assert latest_failure(tmp_path) == "attempt 2: rank 1 on n2 failed first; the other ranks' errors followed from it"


@pytest.mark.parametrize("node", [0, 1])
def test_a_hang_is_one_node_ledger_event_written_by_the_first_node_alone(tmp_path, node):
    """Every node's supervisor sees the hang; only the first node's records the culprit, once."""
    folder = tmp_path / "hangs" / "20261206-200000"
    folder.mkdir(parents=True)
    (folder / "evidence.json").write_text(json.dumps({"culprit": {"rank": 1, "host": "n2"}, "why": "in data of step 21"}))
    ledger = NodeLedger(tmp_path / "ledger.jsonl")
    launch = NodeRun(tmp_path, [], {}, "79.0", WatchdogConfig(), "79", host=f"n{node + 1}", node=node, nodes=2)
    hang = NodeOutcome(HANG_EXIT_CODE, None, folder, {}, grace_s=0.0)
    verdict = record_node_ledger(launch, hang, ledger, "79", ["n1", "n2"])
    assert verdict.why.startswith("hang: rank 1 on n2 is behind (in data of step 21)")
    assert verdict.host == (None if node else "n2")
    assert [(e.kind, e.host) for e in ledger.events()] == ([] if node else [("hang", "n2")])


@pytest.mark.parametrize("signum, words", [
    (signal.SIGUSR2, "preempted (SIGUSR2): saved step 23, exiting with 75 to be requeued"),
    (signal.SIGTERM, "stopped by SIGTERM: saved step 23, exiting with 75 (a preempted job is requeued and resumes "
                     "there, a cancelled one ends)"),
])
def test_the_stop_line_promises_a_requeue_only_after_slurms_warning_signals(signum, words):
    from launcher.train.preemption import PreemptionHandler

    handler = PreemptionHandler()
    handler.received = signal.Signals(signum)
    assert handler.stop_sentence(23) == words


def test_when_a_node_task_died_its_node_is_the_culprit_not_the_ranks_that_stopped():
    """srun ended the step because node 1's task died: node 0's ranks only stopped (SIGTERM), so the one node
    that left no record is to blame; without a task death a lone record names its rank."""
    from launcher.runtime.rank_exits import culprit

    stopped = [RankExit(0, "n1", 0, 10.0)]
    assert culprit(stopped, ["n1", "n2"], task_died=True) == ("n2", "the node task on n2 died")
    assert culprit(stopped, ["n1", "n2"]) == ("n1", "rank 0 on n1 failed first")
    assert culprit([], ["n1", "n2"], task_died=True) is None  # two silent nodes: nothing singles one out
    # node 1's task ended on purpose (its rank's LaunchError, a TrainingError) after leaving its record: no death
    assert culprit(stopped + [RankExit(1, "n2", 1, 9.0)], ["n1", "n2"], task_died=True) is None


@pytest.mark.parametrize("received, cause", [([], "doctor"), ([signal.SIGTERM], "SIGTERM")])
def test_an_attempt_that_ends_in_its_doctor_ends_its_incarnation_in_the_jobs_ledger(tmp_path, monkeypatch, received,
                                                                                     cause):
    """So goodput counts its time (an incarnation without events was dropped)."""
    from cluster import executor

    report = NodeReport(0, "n1", "9", checks=[Check("software", FAIL, "torch 0.0.0 here")])
    monkeypatch.setattr(executor, "preflight", lambda *a: report)
    monkeypatch.setattr(executor, "node_address", lambda node: node)
    task = executor.NodeTask(str(tmp_path), 3, 0, 60)
    signals = SignalLog()
    signals.received.extend(received)
    with pytest.raises(executor.TrainingError):
        doctor_part_of_attempt(task, SimpleNamespace(node=0, job_id="9", global_rank=0), signals)
    [ended] = ledger_events(tmp_path)
    assert (ended["kind"], ended["inc"], ended["cause"]) == ("exit", "9.0", cause)


def test_a_requeued_node_task_keeps_every_field_and_survives_submitits_pickling(tmp_path):
    """checkpoint() is dataclasses.replace: a field added to NodeTask reaches the next attempt without another
    edit; only the requeue count and the step it resumes from change."""
    import dataclasses

    import cloudpickle

    from cluster.executor import NodeTask

    task = NodeTask(str(tmp_path), max_requeues=4, max_restarts=2, dist_timeout_s=90, requeues=1,
                    step_at_last_requeue=3, node_ledger_path="/l.jsonl", doctor=False, min_nodes=2)
    nxt = cloudpickle.loads(cloudpickle.dumps(task)).checkpoint().function
    changed = {f.name for f in dataclasses.fields(NodeTask) if getattr(nxt, f.name) != getattr(task, f.name)}
    assert changed == {"requeues", "step_at_last_requeue"} and (nxt.requeues, nxt.step_at_last_requeue) == (2, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.requeues = 5
