"""`llaunch submit --sweep` on the real local cluster: three one-node elements over the learning rate as ONE job
array, two at a time. Element 1, preempted with USR2 after its first checkpoint, requeues alone as its own array
task and resumes there: its final weights equal those of an uninterrupted `llaunch run` of its config. Every
element ends with its final model, `llaunch status SWEEP` shows the three and the best by eval loss, and `llaunch
cancel SWEEP` ends a running sweep's elements, the pending one too, leaving nothing in the queue. The local
profile without the doctor (tests/slurm/test_slurm_jobs.py runs it): its torch start-up in every attempt would
double this file's time.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster.jobs import job_state
from tests.slurm.test_slurm_jobs import QUICKSTART, ROOT, TINY, final_weights, llaunch, wait_until

pytestmark = pytest.mark.slurm

MAX_STEPS, SAVE_STEPS = 16, 6
RATES = ("1e-3", "3e-3", "1e-2")
SLOW = {"LLAUNCH_FAULT": "slow:rank=0,ms=250"}  # room to preempt element 1 between its checkpoint and its end


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("profile") / "local.yaml"
    local = yaml.safe_load((ROOT / "cluster" / "profiles" / "local.yaml").read_text())
    path.write_text(yaml.safe_dump({**local, "doctor": False}))
    return path


def submit_sweep(out: Path, profile: Path, *extra: str, env: dict[str, str] | None = None) -> str:
    config = profile.parent / "quickstart.yaml"  # outside git: the sweep freezes llaunch alone, whatever the checkout holds
    config.write_text(QUICKSTART.read_text())
    result = llaunch("submit", str(config), *TINY, "--cluster", str(profile), "--nodes", "1",
                     "--output-dir", str(out),
                     "--save-steps", str(SAVE_STEPS), "--sweep", f"training.learning_rate={','.join(RATES)}",
                     "--max-parallel", "2", *extra, env=env)
    match = re.search(r"submitted sweep (\d+) ", result.stdout)
    assert result.returncode == 0 and match, f"{result.stdout}\n{result.stderr}"
    return match.group(1)


def elements(array: str) -> list[str]:
    return [f"{array}_{task}" for task in range(len(RATES))]


def states(array: str) -> list:
    return [job_state(element, dict(os.environ)) for element in elements(array)]


@pytest.fixture(scope="module")
def sweep(slurm_cluster, profile, tmp_path_factory) -> tuple[Path, str, subprocess.Popen]:
    """The sweep, with element 1 preempted once after its first checkpoint and released as soon as SLURM
    allows (a requeued job waits for its BeginTime; slurmd refuses a credential in the second its
    predecessor's was revoked); meanwhile the uninterrupted reference trains element 1's config here."""
    from launcher.jobdir.checkpoint_store import list_checkpoints

    out = tmp_path_factory.mktemp("sweep") / "lr"
    array = submit_sweep(out, profile, "--max-steps", str(MAX_STEPS), env=SLOW)
    config = out / "learning_rate=3e-3" / "config.yaml"
    reference = subprocess.Popen([sys.executable, "-m", "launcher", "run", str(config),
                                  "--output-dir", str(out.parent / "reference")],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    preempted, env = f"{array}_1", dict(os.environ)
    wait_until(lambda: any(i.complete and i.step == SAVE_STEPS for i in list_checkpoints(out / "learning_rate=3e-3")),
               120, "element 1's first checkpoint", preempted)
    subprocess.run(["scancel", "--signal=USR2", preempted], env=env, check=True, timeout=60)
    wait_until(lambda: (s := job_state(preempted, env)).restarts == 1 and s.state == "PENDING", 60,
               "element 1 to requeue itself", preempted)
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"jobid={preempted}", "StartTime=now"], env=env, check=True, timeout=30)
    wait_until(lambda: all(s.finished for s in states(array)), 180, "every element to end", preempted)
    return out, array, reference


def test_a_sweep_runs_as_one_job_array_and_each_element_ends_with_its_model(sweep):
    out, array, _ = sweep
    for task, element in enumerate(elements(array)):
        show = subprocess.run(["scontrol", "--oneliner", "show", "job", element], capture_output=True, text=True)
        assert f" ArrayJobId={array} ArrayTaskId={task} " in show.stdout, show.stdout
        assert "JobState=COMPLETED" in show.stdout and f"Restarts={int(task == 1)} " in show.stdout, show.stdout
    record = json.loads((out / "sweep.json").read_text())
    assert record["array_job_id"] == array
    assert [e["overrides"] for e in record["elements"]] == [[f"training.learning_rate={lr}"] for lr in RATES]
    for lr in RATES:  # each element trained its own config to the end, in its own job dir
        job_dir = out / f"learning_rate={lr}"
        assert (job_dir / "final" / "model.safetensors").is_file()
        assert f"learning_rate: {float(lr)}" in (job_dir / "config.yaml").read_text()
    status = llaunch("status", array)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0].startswith(f"sweep {array} (llaunch-quickstart): 3 element(s) as one job array"), status.stdout
    rows = [line.split() for line in lines[2:5]]
    assert [row[:3] for row in rows] == [[element, f"learning_rate={lr}", "COMPLETED"]
                                         for element, lr in zip(elements(array), RATES)]
    assert rows[1][3:5] == ["(requeued", "1)"] and all(row[-4] == str(MAX_STEPS) for row in rows), status.stdout
    assert all(re.fullmatch(r"\d+\.\d%", row[-1]) for row in rows), status.stdout  # goodput per element
    eval_losses = {lr: float(row[-2]) for lr, row in zip(RATES, rows)}
    best = min(eval_losses, key=eval_losses.get)
    assert lines[5].startswith(f"  best by eval loss: learning_rate={best} "), status.stdout
    listing = llaunch("status").stdout  # the sweep's table stands for its elements: none listed twice
    assert f"sweep {array} " in listing and not any(line.startswith(f"job {array}_") for line in listing.splitlines())


def test_an_element_requeues_alone_and_resumes_exactly(sweep):
    """Element 1 saved at the signal, resumed from that step in its second attempt, and ends with the weights
    of an uninterrupted `llaunch run` of its own config.yaml (the same plan: one CPU process)."""
    out, array, reference = sweep
    job_dir = out / "learning_rate=3e-3"
    logs = llaunch("logs", f"{array}_1").stdout
    saved = re.search(r"preempted \(SIGUSR2\): saved step (\d+), exiting with 75", logs)
    assert saved and SAVE_STEPS <= int(saved.group(1)) < MAX_STEPS, logs[-3000:]
    assert f"resumed from {job_dir / 'checkpoints' / f'step-{saved.group(1)}'}" in logs
    assert "attempt 2" in logs and "attempt 2" not in llaunch("logs", f"{array}_0").stdout
    printed, _ = reference.communicate(timeout=240)
    assert reference.returncode == 0, printed[-3000:]
    straight, resumed = final_weights(out.parent / "reference"), final_weights(job_dir)
    assert straight.keys() == resumed.keys()
    worst = max(float((straight[k].float() - resumed[k].float()).abs().max()) for k in straight)
    assert worst <= 1e-6, f"the resumed element's weights differ from an uninterrupted run's by {worst}"


def test_cancelling_a_sweep_ends_every_element_and_leaves_nothing_queued(sweep, profile, tmp_path):
    out = tmp_path / "cancelled"
    array = submit_sweep(out, profile, "--max-steps", "100000")
    env = dict(os.environ)
    wait_until(lambda: (out / "learning_rate=1e-3" / "metrics.jsonl").exists(), 120, "element 0 to train", array)
    assert [s.state for s in states(array)][2] == "PENDING"  # two nodes, two at a time: element 2 waits
    result = llaunch("cancel", array)
    assert result.returncode == 0 and f"cancelled sweep {array}: {', '.join(elements(array))};" in result.stdout

    def ended():
        now = states(array)
        return all(state.finished for state in now) and now

    ended = wait_until(ended, 90, "every element to end", array)
    assert [s.state for s in ended] == ["CANCELLED"] * 3
    queued = subprocess.run(["squeue", "-h", "-r", "-j", array], env=env, capture_output=True, text=True)
    assert queued.stdout.strip() == "", queued.stdout
    assert "CANCELLED" in llaunch("status", array).stdout
    again = llaunch("cancel", array)
    assert again.returncode == 0 and "had already ended; nothing to cancel" in again.stdout
