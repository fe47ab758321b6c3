"""`llaunch submit` on the real local two-node cluster: gloo across two nodes, one process per node.

One uninterrupted job is the reference; the same job preempted with USR2 after its step-20 checkpoint and
requeued must end with the same weights. A broken config never reaches sbatch, and a job that raises is
not requeued and shows its error in `llaunch status`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.jobs import job_state, load_record

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
MAX_STEPS = 40
SAVE_STEPS = 20
# The quickstart shrunk so that a 2-node job takes under a minute on a 2-core machine.
TINY = [
    "model.overrides={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2, "
    "num_key_value_heads: 1, max_position_embeddings: 64, tie_word_embeddings: true}",
    "data.block_size=32", "data.vocab_size=512", "data.max_train_bytes=300000",
    "training.per_device_train_batch_size=4", "training.gradient_accumulation_steps=1",
    "training.eval_steps=null", "training.logging_steps=5",
]


def llaunch(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=dict(os.environ))


def submit(output_dir: Path, *extra: str, config: Path, overrides: tuple[str, ...] = (),
           timeout: float = 300) -> subprocess.CompletedProcess:
    return llaunch("submit", str(config), *TINY, *overrides, "--nodes", "2", "--output-dir", str(output_dir),
                   "--max-steps", str(MAX_STEPS), "--save-steps", str(SAVE_STEPS), *extra, timeout=timeout)


def job_id_of(result: subprocess.CompletedProcess) -> str:
    match = re.search(r"submitted job (\d+)", result.stdout)
    assert match, f"no job id in:\n{result.stdout}\n{result.stderr}"
    return match.group(1)


def logs_of(job_id: str) -> str:
    return llaunch("logs", job_id).stdout


def wait_until(condition, timeout_s: float, what: str, job_id: str, poll_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}; logs:\n{logs_of(job_id)[-4000:]}")


def final_weights(output_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(output_dir / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """A private copy of the quickstart, so both runs compared below train the very same config."""
    path = tmp_path_factory.mktemp("config") / "quickstart.yaml"
    path.write_text(QUICKSTART.read_text())
    return path


@pytest.fixture(scope="module")
def straight_run(slurm_cluster, config, tmp_path_factory) -> Path:
    """The reference: the quickstart trained on two nodes without interruption (`--wait`)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    result = submit(out, "--wait", config=config, timeout=400)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{logs_of(job_id_of(result))[-4000:]}"
    return out


def test_two_node_job_trains_to_the_end(straight_run):
    record = load_record(None)
    assert Path(record.output_dir) == straight_run.resolve()
    state = job_state(record.job_id, record.env())
    assert state.state == "COMPLETED" and state.restarts == 0
    assert state.nodes == "n[1-2]"  # one task on each node
    assert (straight_run / "final" / "model.safetensors").exists()
    status = llaunch("status", record.job_id)
    assert status.returncode == 0
    assert f"job {record.job_id}" in status.stdout and "COMPLETED" in status.stdout
    assert f"step {MAX_STEPS}" in status.stdout
    # both nodes ran torchrun for a world of 2, rendezvous on the first node
    logs = logs_of(record.job_id)
    assert "node 0/2" in logs and "--nnodes 2" in logs and "attempt 1" in logs
    assert "node 1/2" in llaunch("logs", record.job_id, "--rank", "1").stdout


def test_cluster_up_again_reports_the_running_cluster(slurm_cluster):
    result = llaunch("cluster", "up")
    assert result.returncode == 0
    assert result.stdout.startswith("already running") and f"export SLURM_CONF={slurm_cluster.conf_path}" in result.stdout
    assert llaunch("cluster", "status").stdout.count(" debug") == 2  # both nodes listed


def test_preempted_job_requeues_and_ends_with_the_same_weights(straight_run, config, tmp_path):
    from launcher.train.checkpoint import list_checkpoints

    out = tmp_path / "preempted"
    job_id = job_id_of(submit(out, config=config))
    env = load_record(job_id).env()
    wait_until(lambda: any(i.complete and i.step == SAVE_STEPS for i in list_checkpoints(out)), 240,
               f"the step-{SAVE_STEPS} checkpoint", job_id)
    subprocess.run(["scancel", "--signal=USR2", job_id], env=env, check=True, timeout=30)
    # The job checkpoints, requeues itself and waits in PENDING (BeginTime); release it at once.
    requeued = wait_until(lambda: (s := job_state(job_id, env)).restarts >= 1 and s.state == "PENDING" and s,
                          120, "the job to requeue itself", job_id)
    assert requeued.restarts == 1
    # Release only once the nodes have cleaned up the first run and a second has passed: slurmd refuses a
    # credential issued in the same second its predecessor was revoked ("Job credential revoked").
    wait_until(lambda: set(subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True,
                                          text=True).stdout.split()) == {"idle"}, 60, "idle nodes", job_id)
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], env=env, check=True, timeout=30)
    end = wait_until(lambda: (s := job_state(job_id, env)).finished and s, 240, "the requeued job to end", job_id)
    assert end.state == "COMPLETED", logs_of(job_id)[-4000:]
    assert end.restarts == 1
    logs = logs_of(job_id)
    assert "attempt 2" in logs and "requeue: SIGUSR2 received" in logs
    straight, resumed = final_weights(straight_run), final_weights(out)
    assert straight.keys() == resumed.keys()
    worst = max(float((straight[k].float() - resumed[k].float()).abs().max()) for k in straight)
    assert worst <= 1e-6, f"resumed weights differ from the uninterrupted run's by {worst}"
    assert "requeued 1 time(s)" in llaunch("status", job_id).stdout


def test_broken_config_is_refused_before_sbatch(slurm_cluster, config, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text().replace("learning_rate:", "learning_rat:"))  # a typo in a key
    assert "learning_rat:" in bad.read_text()
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    result = submit(tmp_path / "out", config=bad)
    assert result.returncode == 2
    assert result.stderr.startswith("llaunch: error:") and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    after = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    assert after == before
    assert not (tmp_path / "out" / "slurm").exists()


def test_job_that_raises_is_not_requeued_and_status_shows_the_error(straight_run, config, tmp_path):
    # Sound when submitted (llaunch submit verifies it), damaged before the ranks load it: they raise.
    checkpoint = tmp_path / "step-20"
    shutil.copytree(straight_run / "checkpoints" / "step-20", checkpoint)
    result = submit(tmp_path / "raises", config=config, overrides=(f"training.resume_from_checkpoint={checkpoint}",))
    job_id = job_id_of(result)
    shard = max((p for p in checkpoint.rglob("*") if p.is_file() and p.name != "manifest.json"),
                key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[:16] = bytes(16)  # same size, wrong checksum
    shard.write_bytes(bytes(data))
    env = load_record(job_id).env()
    state = wait_until(lambda: (s := job_state(job_id, env)).finished and s, 180, "the job to fail", job_id)
    time.sleep(3)  # a requeued job would be PENDING again by now
    state = job_state(job_id, env)
    assert state.state == "FAILED" and state.restarts == 0
    status = llaunch("status", job_id).stdout
    assert "FAILED" in status and "error: llaunch: error: checkpoint" in status and "damaged" in status
    assert "attempt 2" not in logs_of(job_id)


def test_cancel_sends_sigterm_to_the_ranks_which_checkpoint_and_the_job_stays_cancelled(straight_run, config, tmp_path):
    from launcher.train.checkpoint import list_checkpoints

    out = tmp_path / "cancelled"
    job_id = job_id_of(submit(out, config=config))
    wait_until(lambda: any(i.complete and i.step == SAVE_STEPS for i in list_checkpoints(out)), 240,
               f"the step-{SAVE_STEPS} checkpoint", job_id)
    result = llaunch("cancel", job_id)
    assert result.returncode == 0 and f"cancelled job {job_id}" in result.stdout
    env = load_record(job_id).env()
    state = wait_until(lambda: (s := job_state(job_id, env)).finished and s, 90, "the job to be cancelled", job_id)
    assert state.state == "CANCELLED" and state.restarts == 0
    # SIGTERM reached the ranks (not torchrun's 30-s kill): they saved the step they were at, then left.
    steps = [i.step for i in list_checkpoints(out) if i.complete]
    assert max(steps) > SAVE_STEPS and not (out / "final").exists(), steps
    logs = logs_of(job_id) + llaunch("logs", job_id, "--rank", "1").stdout
    assert "death signal" not in logs  # torchrun left SIGTERM to the ranks instead of killing them
    assert "CANCELLED" in llaunch("status", job_id).stdout


@pytest.mark.parametrize("conf", ["dead-controller", "missing"])
def test_submit_without_a_reachable_slurm_is_one_sentence(slurm_cluster, tmp_path, conf):
    path = tmp_path / "slurm.conf"
    if conf == "dead-controller":  # the local cluster's config, but nothing listens on the controller port
        text = slurm_cluster.conf_path.read_text()
        path.write_text(re.sub(r"(?m)^SlurmctldPort=\d+", "SlurmctldPort=16999", text))
    env = {**os.environ, "SLURM_CONF": str(path)}
    result = subprocess.run([sys.executable, "-m", "launcher", "submit", str(QUICKSTART), "--nodes", "2",
                             "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, env=env,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.startswith("llaunch: error: SLURM")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
