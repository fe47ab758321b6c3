"""Spare nodes without SLURM (`llaunch submit --spare-nodes K`, cluster.restart): the restart policy, the sbatch
script that allocates N + K nodes and runs N, its loop of steps run by bash, and the batch script's teardown
that restarts a job whose first node's task was killed in a new step without that node, then requeues once the
allocation's --max-restarts are spent. The real hang on a 3-node cluster runs in tests/slurm."""

from __future__ import annotations

import json
import subprocess

import pytest

from cluster import restart, teardown
from cluster.profile import load_profile
from cluster.requeue import decide_restart
from cluster.sbatch import node_task
from cluster.submission import restart_lines, training_parameters
from launcher.errors import NO_NEW_STEP_EXIT_CODE
from launcher.observe import event_ledger
from tests.unit.test_rank_failure import doctor_part_of_attempt
from tests.unit.test_teardown import KILLED_STATUS, make_job, pickled_task


@pytest.mark.parametrize("kwargs,restarts,why", [
    (dict(), True, "hang on n2; restart 1/2 in the allocation resumes from step 20"),
    (dict(restarts_done=2), False, "already restarted 2 time(s) in this allocation, the --max-restarts limit"),
    (dict(healthy=["n1"]), False, "1 healthy node(s) left in the allocation for 2"),
    (dict(restarts_done=1, step_at_last_restart=20), False, "no progress since the last restart"),
    (dict(restarts_done=1, step_at_last_restart=10), True, "restart 2/2"),
    (dict(step=None), True, "from the start (no checkpoint yet)"),
])
def test_restart_policy(kwargs, restarts, why):
    args = dict(cause="hang on n2", restarts_done=0, max_restarts=2, healthy=["n1", "n3"], nodes=2, step=20,
                step_at_last_restart=None) | kwargs
    decision = decide_restart(**args)
    assert decision.restart is restarts and why in decision.reason


def test_spares_allocate_n_plus_k_run_n_and_torchrun_leaves_restarts_to_the_new_steps(tmp_path):
    spares = load_profile("local").replace(nodes=2, spare_nodes=1, max_restarts=2)
    params = training_parameters(spares, "demo", tmp_path / "slurm", "/venv/bin/python")
    assert params["nodes"] == 3 and params["srun_args"][-2:] == ["--nodes=2", "--ntasks=2"]
    assert params["teardown"][1].startswith("while llaunch_step_nodes=$(/venv/bin/python -u -m cluster.teardown "
                                            "--next-step ")
    task = node_task(tmp_path, spares)
    assert (task.max_restarts, task.max_step_restarts) == (0, 2)  # torchrun's, the allocation's
    plain = load_profile("local").replace(nodes=2, max_restarts=2)
    assert training_parameters(plain, "demo", tmp_path / "slurm", "/venv/bin/python")["nodes"] == 2
    assert (node_task(tmp_path, plain).max_restarts, node_task(tmp_path, plain).max_step_restarts) == (2, 0)


def test_the_scripts_loop_runs_a_new_step_with_the_node_choice_until_the_teardown_says_none(tmp_path):
    """bash runs the loop after a failed first step: a stand-in teardown asks for one more step without n2, then
    for none; a stand-in srun records each step; the script ends with the last step's status."""
    python, calls, steps = tmp_path / "python", tmp_path / "calls", tmp_path / "steps"
    python.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n"
                      f"[ $(wc -l < {calls}) -eq 1 ] && {{ echo --exclude=n2; exit 0; }}\nexit 1\n")
    python.chmod(0o755)
    srun = f'srun() {{ echo "$@" >> {steps}; return 7; }}'
    lines = restart_lines(str(python), tmp_path / "slurm", ["--nodes=2", "--ntasks=2"], "/venv/bin/python")
    result = subprocess.run(["bash", "-c", "\n".join([srun, "(exit 137)", *lines])])
    assert result.returncode == 7
    asked = calls.read_text().splitlines()
    assert asked == [f"-u -m cluster.teardown --next-step {tmp_path / 'slurm'} {status}" for status in (137, 7)]
    [step] = steps.read_text().splitlines()
    assert step.startswith("--unbuffered --open-mode=append --output ")
    assert step.endswith(f"--nodes=2 --ntasks=2 --exclude=n2 /venv/bin/python -u -m submitit.core._submit "
                         f"{tmp_path / 'slurm'}")


@pytest.fixture
def job(tmp_path, monkeypatch):
    """tests/unit/test_teardown.py's job 77, its attempt 77.0 launched on n1 and n2, n1's task killed."""
    return make_job(tmp_path, monkeypatch)


def test_a_killed_first_node_task_restarts_on_a_spare_then_the_spent_allocation_requeues(tmp_path, job, capsys,
                                                                                         monkeypatch):
    """Attempt 77.0 ran on n1 and n2 of the allocation n1-n3; n1's task was killed. The teardown restarts the job
    in a new step without n1 (no requeue: the pickled task counts the restart), says so on stdout for the
    script, once (a step whose tasks die before they launch is not run again); once that step has run, nothing
    more is pending. Its own first task's death after that requeues: the allocation's restarts are spent."""
    folder, requeued, submitted = job
    monkeypatch.setattr(restart, "node_hostnames", lambda nodelist: ["n1", "n2", "n3"])
    submitted(max_requeues=2, max_step_restarts=1)
    assert teardown.main(["--next-step", str(folder), str(KILLED_STATUS)]) == 0
    assert capsys.readouterr().out == "--exclude=n1\n" and requeued == []
    task = pickled_task(folder)
    assert (task.requeues, task.step_restarts, task.excluded, task.attempt("77")) == (0, 1, ("n1",), "77.0.1")
    [restarted] = [e for e in event_ledger.read(tmp_path) if e["kind"] == event_ledger.RESTART]
    assert (restarted["inc"], restarted["next"], restarted["exclude"]) == ("77.0", "77.0.1", ["n1"])
    assert "the node task on n1 died; restart 1/1 in the allocation" in restarted["reason"]

    assert teardown.main(["--next-step", str(folder), "1"]) == NO_NEW_STEP_EXIT_CODE  # its tasks died unlaunched
    assert capsys.readouterr().out == ""  # the restart's step runs once, never in a loop
    event_ledger.append(tmp_path, event_ledger.LAUNCH, inc="77.0.1", nodes=2, hosts=["n2", "n3"])
    assert teardown.main(["--next-step", str(folder), "0"]) == NO_NEW_STEP_EXIT_CODE  # it finished
    with pytest.raises(SystemExit):  # its first node's task killed in turn: the allocation's restarts are spent
        teardown.main(["--next-step", str(folder), str(KILLED_STATUS)])
    assert requeued == ["77"] and pickled_task(folder).requeues == 1
    assert (pickled_task(folder).step_restarts, pickled_task(folder).excluded) == (0, ())  # a new allocation


@pytest.mark.parametrize("check, restarts", [("software", True), ("space", False)])
def test_a_node_that_fails_the_doctor_is_replaced_by_a_spare_unless_the_failure_is_the_jobs(tmp_path, job, monkeypatch,
                                                                                           check, restarts):
    """n2 fails the doctor of attempt 77.0 of a job with a spare. A software mismatch is n2's: its task leaves the
    decision to the first node (its error would end the step first), which reads n2's report of this attempt
    and restarts the job in a new step without n2. Too little space on the shared dir is the job's: n2 and the
    first node end the job with n2's sentence, and nothing is restarted."""
    from types import SimpleNamespace

    from submitit.core.utils import JobPaths

    from cluster import executor
    from cluster.doctor.checks import FAIL, OK, Check
    from cluster.doctor.node import NodeReport, results_path
    from launcher.observe.node_ledger import NodeLedger
    from launcher.runtime.node import SignalLog

    folder, requeued, submitted = job
    monkeypatch.setattr(restart, "node_hostnames", lambda nodelist: ["n1", "n2", "n3"])
    monkeypatch.setattr(executor, "node_address", lambda host: host)
    task = submitted(max_requeues=2, max_step_restarts=1)
    reports = {0: NodeReport(0, "n1", "77", [Check("software", OK, "as on n1")], peers_failed=1, attempt="77.0"),
               1: NodeReport(1, "n2", "77", [Check(check, FAIL, "not as on n1")], attempt="77.0")}
    monkeypatch.setattr(executor, "preflight", lambda job_dir, hosts, addresses, node, *rest: reports[node])
    stale = results_path(tmp_path, 1)  # what n2 wrote for an earlier attempt is not read as this one's
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps(NodeReport(1, "n2", "77", [Check("gpus", FAIL, "old")], attempt="76.0").to_dict()))

    def doctor(node: int):
        job_env = SimpleNamespace(node=node, job_id="77", global_rank=node, paths=JobPaths(folder, job_id="77"))
        return doctor_part_of_attempt(task, job_env, SignalLog())

    with pytest.MonkeyPatch.context() as wait:
        wait.setattr(executor, "DOCTOR_REPORT_WAIT_S", 0.5)
        with pytest.raises(executor.TrainingError, match="another node failed its checks"):
            doctor(0)  # n2's report of this attempt not written: nothing says whose fault it is
    stale.write_text(json.dumps(reports[1].to_dict()))
    if not restarts:
        for node in (1, 0):
            with pytest.raises(executor.TrainingError, match=f"doctor: {check} failed on n2: not as on n1"):
                doctor(node)
        assert pickled_task(folder).step_restarts == 0 and NodeLedger(tmp_path / "nodes.jsonl").events() == []
        return
    assert doctor(1) == "no torchrun on node 1: the doctor failed; the first node decides about a restart"
    assert doctor(0) == "restarting in the allocation without n2"
    following = pickled_task(folder)
    assert (following.step_restarts, following.excluded, following.requeues, requeued) == (1, ("n2",), 0, [])
    [restarted] = [e for e in event_ledger.read(tmp_path) if e["kind"] == event_ledger.RESTART]
    assert restarted["exclude"] == ["n2"] and "doctor: software failed on n2" in restarted["reason"]
    assert [(e.kind, e.host) for e in NodeLedger(tmp_path / "nodes.jsonl").events()] == [("doctor", "n2")]
