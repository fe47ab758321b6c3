"""The notify hook (cluster/notify.py): what its command finds in its environment, its log in the job dir, and that
a hook that fails, is missing or hangs never reaches the job; the node task's states through the real NodeTask
(with a stand-in torchrun, tests/conftest.py's slurm_node)."""

from __future__ import annotations

import json
import sys
import time

import psutil
import pytest

from cluster import notify
from launcher.jobdir.layout import JobDir


def logged(job_dir) -> list[dict]:
    return [json.loads(line) for line in JobDir(job_dir).notify_log.read_text().splitlines()]


def test_the_hook_reads_the_job_its_state_and_its_newest_step_and_loss():
    env = notify.hook_env("77", notify.PREEMPTED, "/jobs/a", {"step": 20, "loss": 5.43210987, "lr": 1e-3})
    assert env == {"LLAUNCH_JOB_ID": "77", "LLAUNCH_JOB_STATE": "preempted", "LLAUNCH_JOB_DIR": "/jobs/a",
                   "LLAUNCH_JOB_STEP": "20", "LLAUNCH_JOB_LOSS": "5.43211"}
    before = notify.hook_env("77", notify.SUBMITTED, "/jobs/a", None)
    assert (before["LLAUNCH_JOB_STEP"], before["LLAUNCH_JOB_LOSS"]) == ("", "")
    with pytest.raises(ValueError, match="unknown job state 'PREEMPTED'"):
        notify.hook_env("77", "PREEMPTED", "/jobs/a", None)


def test_a_hook_runs_with_the_jobs_variables_and_its_run_is_logged_in_the_job_dir(tmp_path):
    JobDir(tmp_path).metrics.write_text('{"step": 5, "loss": 6.5}\n{"step": 10, "loss": 6.25}\n{"step": 10, '
                                        '"eval_loss": 6.0}\n')
    heard = tmp_path / "heard"
    hook = f'echo "$LLAUNCH_JOB_STATE $LLAUNCH_JOB_STEP $LLAUNCH_JOB_LOSS $LLAUNCH_JOB_ID $LLAUNCH_JOB_DIR" >> {heard}; echo ok'
    for state in (notify.STARTED, notify.COMPLETED):
        notify.notify(hook, str(tmp_path), "77", state)
    assert heard.read_text().splitlines() == [f"started 10 6.25 77 {tmp_path}", f"completed 10 6.25 77 {tmp_path}"]
    assert [(r["state"], r["job_id"], r["code"], r["output"]) for r in logged(tmp_path)] == [
        ("started", "77", 0, "ok\n"), ("completed", "77", 0, "ok\n")]
    notify.notify("", str(tmp_path), "77", notify.FAILED)  # no hook: nothing runs, nothing is logged
    assert len(logged(tmp_path)) == 2


def test_a_failing_or_missing_hook_is_logged_and_never_raised(tmp_path):
    notify.notify("echo broken >&2; exit 3", str(tmp_path), "77", notify.HANG)
    notify.notify(str(tmp_path / "no-such-hook"), str(tmp_path), "77", notify.FAILED)
    failing, missing = logged(tmp_path)
    assert (failing["state"], failing["code"], failing["output"]) == ("hang", 3, "broken\n")
    assert missing["code"] == 127 and "not found" in missing["output"]


def test_a_slow_hook_is_killed_with_everything_it_started_after_its_time(tmp_path):
    pid_file = tmp_path / "pid"
    start = time.monotonic()
    notify.notify(f"sleep 60 & echo $! > {pid_file}; wait", str(tmp_path), "77", notify.REQUEUED, timeout_s=0.5)
    assert time.monotonic() - start < 5
    [record] = logged(tmp_path)
    assert record["error"] == "killed after 0.5 s" and record["code"] == -9
    child, deadline = int(pid_file.read_text()), time.monotonic() + 2
    while running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(child)  # the hook's own child is gone too: its process group was killed


def running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan that no one has reaped yet has ended)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("code, max_requeues, states", [
    (0, 1, ["started", "completed"]),
    (1, 1, ["started", "requeued"]),  # a rank died without a sentence: a node failure, requeued
    (1, 0, ["started", "failed"]),  # ... with no requeue left
])
def test_the_node_task_tells_the_hook_how_each_attempt_ends(tmp_path, monkeypatch, slurm_node, code, max_requeues,
                                                            states):
    monkeypatch.setenv("LLAUNCH_WATCHDOG", "off")
    heard = tmp_path / "heard"
    task = slurm_node(tmp_path, [sys.executable, "-c", f"raise SystemExit({code})"], max_requeues=max_requeues,
                      notify=f'echo "$LLAUNCH_JOB_STATE" >> {heard}')
    if code == 0:
        task()
    else:
        with pytest.raises((SystemExit, slurm_node.executor.TrainingError)):
            task()
    assert heard.read_text().split() == states
    assert [r["state"] for r in logged(tmp_path)] == states
