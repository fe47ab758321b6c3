"""The batch script's teardown (cluster.teardown) without SLURM: when the first node's task of a two-node job
was SIGKILLed after its launch, it closes the attempt as killed, blames that task's node (the one that left no
record of its ranks) and requeues through submitit's own handler, which writes the next attempt's task with
one more requeue into the job's pickle; past --max-requeues it says why in one sentence and the job keeps the
step's status; an attempt its task decided is left alone. The real SIGKILL runs in tests/slurm."""

from __future__ import annotations

import json

import pytest
from submitit.core.utils import DelayedSubmission, JobPaths

from cluster import teardown
from cluster.executor import NodeTask
from launcher.observe import event_ledger
from launcher.observe.node_ledger import NodeLedger
from launcher.runtime.node import record_exit, record_launch
from launcher.runtime.rank_exits import exits_path

KILLED_STATUS = 137  # srun's status when a task died of SIGKILL


@pytest.fixture
def job(tmp_path, monkeypatch):
    return make_job(tmp_path, monkeypatch)


def make_job(tmp_path, monkeypatch):
    """Job 77 on n1 and n2, its attempt 77.0 launched; node 1 recorded its rank's end, node 0's task did not.
    Returns the log folder, the requeues submitit asked of scontrol and a writer of the job's pickled task."""
    folder = tmp_path / "slurm"
    folder.mkdir()
    requeued = []
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n[1-2]")
    monkeypatch.setattr(teardown, "node_hostnames", lambda nodelist: ["n1", "n2"])
    monkeypatch.setattr(teardown, "job_running", lambda job_id: True)
    monkeypatch.setattr("cluster.executor.node_can_be_spared", lambda host, job_id, min_nodes: False)
    monkeypatch.setattr("submitit.slurm.slurm.SlurmJobEnvironment._requeue",
                        lambda env, countdown: requeued.append(env.job_id))
    record_launch(tmp_path, "77.0", 2, "slurm", job_id="77", attempt=1)
    path = exits_path(tmp_path, "77.0", 1)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps([{"rank": 1, "host": "n2", "node": 1, "ended_t": 5.0}]))

    def submitted(max_requeues: int, **fields) -> NodeTask:
        task = NodeTask(str(tmp_path), max_requeues=max_requeues, max_restarts=0, dist_timeout_s=60,
                        node_ledger_path=str(tmp_path / "nodes.jsonl"), **fields)
        delayed = DelayedSubmission(task)
        delayed.set_timeout(30, max_requeues)
        delayed.dump(JobPaths(folder, job_id="77").submitted_pickle)
        return task

    return folder, requeued, submitted


def pickled_task(folder) -> NodeTask:
    return DelayedSubmission.load(JobPaths(folder, job_id="77").submitted_pickle).function


def test_a_killed_first_node_task_is_requeued_counted_in_the_pickled_task_and_its_node_blamed(tmp_path, job):
    folder, requeued, submitted = job
    submitted(max_requeues=2)
    with pytest.raises(SystemExit):  # submitit's handler exits once `scontrol requeue` accepted the job
        teardown.main([str(folder), str(KILLED_STATUS)])
    assert requeued == ["77"]
    assert (pickled_task(folder).requeues, pickled_task(folder).step_at_last_requeue) == (1, None)
    ends = {e["kind"]: e for e in event_ledger.read(tmp_path) if e["kind"] in ("exit", "requeue")}
    assert (ends["exit"]["inc"], ends["exit"]["code"], ends["exit"]["cause"]) == ("77.0", 137, event_ledger.KILLED)
    assert ends["requeue"]["reason"] == "the node task on n1 died; requeue 1/2 resumes from the start (no checkpoint yet)"
    [blamed] = NodeLedger(tmp_path / "nodes.jsonl").events()
    assert (blamed.host, blamed.kind, blamed.job_id) == ("n1", "rank_failed", "77")


def test_past_max_requeues_the_job_keeps_the_steps_status_with_one_sentence(tmp_path, job, capsys):
    folder, requeued, submitted = job
    submitted(max_requeues=0)
    assert teardown.main([str(folder), str(KILLED_STATUS)]) == KILLED_STATUS
    assert requeued == [] and pickled_task(folder).requeues == 0
    err = capsys.readouterr().err.strip()
    assert err == ("llaunch: error: job stopped by a node failure and not requeued: already requeued 0 time(s), "
                   "the --max-requeues limit")


@pytest.mark.parametrize("decided", ["exit", "requeue"])
def test_an_attempt_its_first_node_task_decided_is_left_alone(tmp_path, job, capsys, decided):
    folder, requeued, submitted = job
    submitted(max_requeues=2)
    if decided == "exit":  # the task raised the job's error after recording the attempt's end
        record_exit(tmp_path, "77.0", 2, None)
    else:  # the task requeued the job and died before SLURM ended the batch script
        event_ledger.append(tmp_path, event_ledger.REQUEUE, inc="77.0", reason="SIGUSR2 received")
    assert teardown.main([str(folder), "1"]) == 1
    assert requeued == [] and pickled_task(folder).requeues == 0
    assert "the first node's task decided about this attempt" in capsys.readouterr().out
    assert not NodeLedger(tmp_path / "nodes.jsonl").events()


@pytest.mark.parametrize("status", [0, 1, 137])
def test_the_scripts_teardown_runs_only_after_a_failed_step_and_keeps_its_status(tmp_path, status):
    """The lines submitit puts after srun, run by bash after a step that exited with `status`: a stand-in python
    records what it was asked; the script ends with the step's status whatever the teardown did."""
    import subprocess

    from cluster.submission import teardown_lines

    python, called = tmp_path / "python", tmp_path / "called"
    python.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {called}\nexit 3\n")  # one argument a line
    python.chmod(0o755)
    script = "\n".join([f"(exit {status})", "", "# teardown", *teardown_lines(str(python), tmp_path / "my logs")])
    assert subprocess.run(["bash", "-c", script]).returncode == status
    asked = called.read_text().splitlines() if called.exists() else None
    assert asked == (None if status == 0 else ["-u", "-m", "cluster.teardown", str(tmp_path / "my logs"), str(status)])
