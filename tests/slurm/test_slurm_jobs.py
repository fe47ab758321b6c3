"""`llaunch submit` on the real local two-node cluster: gloo across two nodes, one process per node.

One uninterrupted job is the reference; the same job preempted with USR2 (twice, under CPU load) after its
step-20 checkpoint saves the step it was at, requeues once, resumes there and ends with the same weights, and
its goodput counts the queue wait after the requeue and the restore. That job is submitted from a user's git
repository and a copy of llaunch, both edited after the submit: it runs from its frozen code all the same, and
its notify hook hears every state in order. A job that hangs on one node (--min-nodes 1)
is requeued without that node and finishes on the other, its losses those of the uninterrupted run; with a
spare node (`cluster up --nodes 3`) it restarts in its allocation on the spare instead and ends with the
uninterrupted weights.
A broken config or a request the partition cannot run never reaches sbatch, a job dir belongs to one job,
a job that raises is not requeued and shows its error in `llaunch status`, and `cluster down` ends the jobs
before it stops the daemons.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from cluster.jobs import job_state, load_record
from launcher.jobdir.layout import JobDir

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
MAX_STEPS = 40
SAVE_STEPS = 20
# Room for a signal between the step-SAVE_STEPS checkpoint and the job's end: unslowed, the 20 steps after it take
# about a second, less than `scancel` or `llaunch cancel` may take under load (rank 0 slows the whole step).
SIGNAL_ROOM = {"LLAUNCH_FAULT": "slow:rank=0,ms=400"}
# The quickstart shrunk so that a 2-node job takes under a minute on a 2-core machine.
TINY = [
    "model.overrides={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2, "
    "num_key_value_heads: 1, max_position_embeddings: 64, tie_word_embeddings: true}",
    "data.block_size=32", "data.vocab_size=512", "data.max_train_bytes=300000",
    "training.per_device_train_batch_size=4", "training.gradient_accumulation_steps=1",
    "training.eval_steps=null", "training.logging_steps=5",
]


def llaunch(*args: str, timeout: float = 300, env: dict[str, str] | None = None,
            cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})})


def submit(output_dir: Path, *extra: str, config: Path, overrides: tuple[str, ...] = (),
           timeout: float = 300, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """sbatch exports the submitting environment to the job, so `env` reaches every node's ranks."""
    return llaunch("submit", str(config), *TINY, *overrides, "--nodes", "2", "--output-dir", str(output_dir),
                   "--max-steps", str(MAX_STEPS), "--save-steps", str(SAVE_STEPS), *extra, timeout=timeout, env=env,
                   cwd=cwd)


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


@contextmanager
def cpu_load(processes: int = 2):
    """Busy processes beside the job, as on a loaded node: signal copies then arrive seconds apart."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()


def idle(env: dict[str, str]) -> bool:
    """Whether every node is idle (none still cleaning up after a job)."""
    return set(subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True,
                              text=True).stdout.split()) == {"idle"}


def no_message_pending(env: dict[str, str]) -> bool:
    """Whether slurmctld has no message still to deliver (sdiag's agent queue and agents both 0). A slurmd too
    loaded to answer gets its messages retried later: a retried "signal step JOB.0" of the old attempt would
    then stop the requeued attempt's step, which has the same id."""
    out = subprocess.run(["sdiag"], env=env, capture_output=True, text=True, timeout=30).stdout
    counts = re.findall(r"^Agent (?:queue size|count):\s*(\d+)", out, flags=re.M)
    return len(counts) == 2 and counts == ["0", "0"]


def release(job_id: str, env: dict[str, str]) -> None:
    """Start a requeued job now instead of after its BeginTime, once the nodes have cleaned up the first run
    (a --nodes=1-2 job released earlier starts on the one idle node), slurmctld has delivered every message
    about it (no_message_pending) and two seconds have passed: slurmd refuses a credential issued in the same
    second its predecessor was revoked ("Job credential revoked"), and the requeue revoked it before the job
    showed PENDING. The README's recipe, StartTime=now+2, keeps the same rule without watching the nodes."""
    wait_until(lambda: idle(env) and no_message_pending(env), 120, "idle nodes and no message pending", job_id)
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], env=env, check=True, timeout=30)


def submit_on_both_nodes(parent: Path, *extra: str, config: Path, env: dict[str, str]) -> tuple[Path, str]:
    """A job of --nodes=1-2 that started on both nodes, and its output directory. Submit leaves a quarantined
    host out of such a job (it can spare it), so the node ledger (the caller's LLAUNCH_HOME) must hold none;
    and both nodes must be idle, or slurmctld starts it on the one that is."""
    from launcher.observe.node_ledger import NodeLedger, QuarantinePolicy, quarantined

    held = quarantined(NodeLedger.for_profile("local").events(), QuarantinePolicy())
    assert not held, f"an earlier test's node-ledger events quarantine {held}"
    wait_until(lambda: idle(os.environ), 60, "idle nodes", "(none yet)")
    out = parent / "hang"
    job_id = job_id_of(submit(out, *extra, config=config, env=env))
    start = wait_until(lambda: (s := job_state(job_id, os.environ)).state == "RUNNING" and s, 60,
                       "the job to start", job_id)
    assert start.nodes == "n[1-2]", f"--nodes=1-2 started on {start.nodes} only"
    return out, job_id


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
    for node in (0, 1):
        log = (straight_run / "slurm" / f"{record.job_id}_{node}_log.out").read_text()
        assert f"node {node}/2" in log and "--nnodes 2" in log and "attempt 1" in log
    # `llaunch logs` shows the node a rank ran on, wherever the rendezvous put it (rank 0 is not always on node 0)
    logs = logs_of(record.job_id)
    assert "rank 0 of 2 starts" in logs and "training " in logs
    assert "rank 1 of 2 starts" in llaunch("logs", record.job_id, "--rank", "1").stdout
    cancel = llaunch("cancel", record.job_id)
    assert cancel.returncode == 0 and "had already ended (COMPLETED); nothing to cancel" in cancel.stdout


def test_cluster_up_again_reports_the_running_cluster(slurm_cluster):
    result = llaunch("cluster", "up")
    assert result.returncode == 0
    assert result.stdout.startswith("already running") and f"export SLURM_CONF={slurm_cluster.conf_path}" in result.stdout
    assert llaunch("cluster", "status").stdout.count(" debug") == 2  # both nodes listed


def checkouts(tmp_path: Path, config: Path) -> tuple[Path, Path, dict[str, str]]:
    """A user's git repository holding the config and a module every python process of the job imports at start
    (sitecustomize, from PYTHONPATH), and a copy of llaunch's packages; the environment that submits from them."""
    repo, own = tmp_path / "repo", tmp_path / "llaunch"
    repo.mkdir()
    shutil.copy(config, repo / "train.yaml")
    (repo / "sitecustomize.py").write_text("FROZEN = 'as committed'\n")
    for command in (["init", "-q"], ["add", "."], ["-c", "user.name=u", "-c", "user.email=u@x", "commit", "-qm", "c"]):
        subprocess.run(["git", "-C", str(repo), *command], check=True, capture_output=True)
    for package in ("launcher", "cluster", "ds_configs"):
        shutil.copytree(ROOT / package, own / package, ignore=shutil.ignore_patterns("__pycache__"))
    return repo, own, {"PYTHONPATH": f"{own}:{repo}"}


def edit_after_submit(repo: Path, own: Path, marker: Path) -> None:
    """What the job must not see: the user's module and llaunch's, each leaving a mark wherever it is imported."""
    for module in (repo / "sitecustomize.py", own / "launcher" / "__init__.py"):
        module.write_text(module.read_text() + f"\nopen({str(marker)!r}, 'a').write({str(module)!r} + '\\n')\n")


def test_preempted_job_saves_at_the_signal_requeues_once_runs_its_frozen_code_and_ends_with_the_same_weights(
        straight_run, config, tmp_path):
    out, marker, heard = tmp_path / "preempted", tmp_path / "edited-code-ran", tmp_path / "notified"
    repo, own, from_checkouts = checkouts(tmp_path, config)
    hook = f'echo "$LLAUNCH_JOB_STATE $LLAUNCH_JOB_STEP $LLAUNCH_JOB_ID" >> {heard}'
    job_id = job_id_of(submit(out, "--notify", hook, config=repo / "train.yaml", env={**from_checkouts, **SIGNAL_ROOM},
                              cwd=repo))
    edit_after_submit(repo, own, marker)
    env = load_record(job_id).env()
    # The job dir belongs to this job: a dry run writes nothing into it, a second submit is refused.
    written = {name: (out / name).read_bytes() for name in ("config.yaml", "plan.yaml")}
    dry = submit(out, "--dry-run", config=config, overrides=("training.learning_rate=1.0",))
    assert dry.returncode == 0 and "nothing written, nothing submitted" in dry.stdout, dry.stderr
    second = submit(out, config=config, overrides=("training.learning_rate=1.0",))
    assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1
    assert f"belongs to job {job_id}, which is " in second.stderr
    assert {name: (out / name).read_bytes() for name in written} == written
    step = preempt_and_resume(job_id, out, env)
    assert_same_weights(straight_run, out)
    status = llaunch("status", job_id).stdout
    assert "requeued 1 time(s)" in status
    assert_goodput_counts_the_requeue(out, job_id, step, status)
    assert_frozen_code_ran_and_the_hook_heard_every_state(out, job_id, repo, marker, heard, status)


def preempt_and_resume(job_id: str, out: Path, env: dict[str, str]) -> int:
    """USR2 (twice, under CPU load) after the step-SAVE_STEPS checkpoint: the job saves the step it was at,
    requeues itself once, is released and resumes there to the end. The step it saved at."""
    from launcher.jobdir.checkpoint_store import list_checkpoints

    wait_until(lambda: any(i.complete and i.step == SAVE_STEPS for i in list_checkpoints(out)), 240,
               f"the step-{SAVE_STEPS} checkpoint", job_id)
    with cpu_load():  # SLURM delivers USR2 to every process of the step, the node task forwards it too
        subprocess.run(["scancel", "--signal=USR2", job_id], env=env, check=True, timeout=120)
        time.sleep(1.5)  # a second USR2, later than any duplicate window
        subprocess.run(["scancel", "--signal=USR2", job_id], env=env, timeout=120)
        # The job checkpoints, requeues itself and waits in PENDING (BeginTime); release it at once.
        requeued = wait_until(lambda: (s := job_state(job_id, env)).restarts >= 1 and s.state == "PENDING" and s,
                              120, "the job to requeue itself", job_id)
    assert requeued.restarts == 1
    release(job_id, env)
    end = wait_until(lambda: (s := job_state(job_id, env)).finished and s, 240, "the requeued job to end", job_id)
    assert end.state == "COMPLETED", logs_of(job_id)[-4000:]
    assert end.restarts == 1
    rank0 = logs_of(job_id)  # the node that ran rank 0 in the last attempt
    every_node = rank0 + llaunch("logs", job_id, "--rank", "1").stdout
    saved = re.search(r"preempted \(SIGUSR2\): saved step (\d+), exiting with 75", every_node)
    assert saved, every_node[-4000:]
    step = int(saved.group(1))
    assert SAVE_STEPS < step < MAX_STEPS
    assert f"requeue: SIGUSR2 received; requeue 1/3 resumes from step {step}" in every_node
    assert f"resumed from {out.resolve() / 'checkpoints' / f'step-{step}'} at step {step}" in rank0
    assert "attempt 2" in every_node and "attempt 3" not in every_node
    assert "ChildFailedError" not in every_node  # every rank exited 75: none was killed by a late copy
    return step


def assert_same_weights(straight_run: Path, resumed_run: Path) -> None:
    straight, resumed = final_weights(straight_run), final_weights(resumed_run)
    assert straight.keys() == resumed.keys()
    worst = max(float((straight[k].float() - resumed[k].float()).abs().max()) for k in straight)
    assert worst <= 1e-6, f"resumed weights differ from the uninterrupted run's by {worst}"


# Tensor parallel 2 across the nodes: one process per node holds half of every layer (kv heads split in two).
TP_ACROSS_NODES = ("--strategy", "fsdp", "--tp", "2")
TP_OVERRIDES = (TINY[0].replace("num_key_value_heads: 1", "num_key_value_heads: 2"),)


def test_a_tensor_parallel_job_across_the_nodes_resumes_exactly_after_a_preemption(slurm_cluster, config, tmp_path):
    """TP 2 with one rank per node, so every layer's collectives cross the nodes: preempted with USR2 after its
    step-20 checkpoint, it resumes from its DTensor checkpoint and ends with an uninterrupted TP run's weights."""
    straight = tmp_path / "straight"
    result = submit(straight, "--wait", *TP_ACROSS_NODES, config=config, overrides=TP_OVERRIDES, timeout=400)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{logs_of(job_id_of(result))[-4000:]}"
    assert yaml.safe_load((straight / "plan.yaml").read_text())["parallel"]["tp"] == 2
    out = tmp_path / "preempted"
    job_id = job_id_of(submit(out, *TP_ACROSS_NODES, config=config, overrides=TP_OVERRIDES, env=SIGNAL_ROOM))
    preempt_and_resume(job_id, out, load_record(job_id).env())
    assert_same_weights(straight, out)


def assert_frozen_code_ran_and_the_hook_heard_every_state(out: Path, job_id: str, repo: Path, marker: Path,
                                                          heard: Path, status: str) -> None:
    """Every attempt ran from JOB_DIR/code (the edited modules never ran), `status` names the commit, and the hook
    heard the job's states in order, with the step each happened at."""
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert not marker.exists(), marker.read_text()
    assert f"code: {repo.resolve()} @ {commit[:12]}; llaunch from " in status, status
    doctor = json.loads((JobDir(out).doctor / "node-0.json").read_text())  # the node's packages: those recorded
    assert [c["status"] for c in doctor["checks"] if c["name"] == "environment"] == ["ok"], doctor
    lines = [line.split() for line in heard.read_text().splitlines()]
    assert [words[0] for words in lines] == ["submitted", "started", "preempted", "requeued", "restarted",
                                             "completed"], lines
    assert {words[-1] for words in lines} == {job_id} and lines[-1][1] == str(MAX_STEPS), lines
    logged = [json.loads(line) for line in JobDir(out).notify_log.read_text().splitlines()]
    assert [(r["state"], r["code"]) for r in logged] == [(words[0], 0) for words in lines], logged


def assert_goodput_counts_the_requeue(out: Path, job_id: str, step: int, status: str) -> None:
    """Both incarnations are in the job's ledger, and goodput counts the wait in the queue after the requeue
    (at least the idle-nodes wait and the two seconds before the release) and the restore."""
    from launcher.observe import event_ledger

    events = event_ledger.read(out)
    launches = [e for e in events if e["kind"] == event_ledger.LAUNCH]
    assert [(e["inc"], e["attempt"]) for e in launches] == [(f"{job_id}.0", 1), (f"{job_id}.1", 2)], launches
    requeued_at = next(e["t"] for e in events if e["kind"] == event_ledger.REQUEUE)
    assert launches[1]["seconds"] >= 2 and launches[1]["submit_t"] >= requeued_at - 1, launches[1]
    result = llaunch("goodput", job_id, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [inc["restored_step"] for inc in report["incarnations"]] == [None, step]
    span = events[-1]["t"] - events[0]["t"]
    assert abs(sum(report["seconds"].values()) - span) <= 0.02 * span, (report["seconds"], span)
    # SLURM keeps StartTime in whole seconds (truncated): the queue ends at it, up to a second before the
    # attempt really started, while the ledger's requeue event that begins the queue is exact.
    assert report["seconds"]["queue"] >= launches[1]["seconds"] - 1 and report["seconds"]["restore"] > 0
    assert re.search(r"goodput \d+\.\d% of .* over 2 incarnation\(s\): queue ", status), status


def test_a_hang_requeues_the_job_without_the_culprits_node_and_it_finishes_on_the_other(straight_run, config,
                                                                                        tmp_path, monkeypatch):
    """--min-nodes 1: rank 1 hangs at step 25; the watchdog kills the ranks, the job is requeued with the
    culprit's node in its ExcNodeList and resumes from step 20 on the other node alone, with the same global
    batch (twice the accumulation), so its losses continue those of the uninterrupted run. A home of its own:
    on a loaded machine the earlier jobs' straggler events in the session's node ledger quarantine a node."""
    import json

    monkeypatch.setenv("LLAUNCH_HOME", str(tmp_path / "home"))
    faults = {"LLAUNCH_FAULT": "hang:rank=1,step=25", "LLAUNCH_WATCHDOG": "poll_s=0.5,floor_s=5,grace_s=5"}
    env = {**os.environ}
    out, job_id = submit_on_both_nodes(tmp_path, "--min-nodes", "1", config=config, env=faults)
    wait_until(lambda: (s := job_state(job_id, env)).restarts >= 1 and s.state == "PENDING", 240,
               "the hung job to requeue itself", job_id)
    records = [json.loads(path.read_text()) for path in out.glob("hangs/*/evidence.json")]  # 2 if both saw it
    culprit = records[0]["culprit"]
    assert culprit["rank"] == 1 and all(r["culprit"] == culprit and r["nodes_answered"] == "2 of 2" for r in records)
    show = subprocess.run(["scontrol", "--oneliner", "show", "job", job_id], env=env, capture_output=True,
                          text=True).stdout
    assert f" ExcNodeList={culprit['host']} " in show, show
    release(job_id, env)
    end = wait_until(lambda: (s := job_state(job_id, env)).finished and s, 240, "the requeued job to end", job_id)
    assert end.state == "COMPLETED" and end.restarts == 1, logs_of(job_id)[-4000:]
    assert end.nodes == ({"n1", "n2"} - {culprit["host"]}).pop()
    logs = logs_of(job_id)
    assert "requeue: hang on " + culprit["host"] + "; requeue 1/3 resumes from step 20" in \
        logs + llaunch("logs", job_id, "--rank", "1").stdout
    assert "--nnodes 1" in logs and f"resumed from {out.resolve() / 'checkpoints' / 'step-20'} at step 20" in logs

    def losses(run: Path) -> dict[int, float]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {row["step"]: row["loss"] for row in rows if "loss" in row}

    straight, resumed = losses(straight_run), losses(out)
    after = [step for step in straight if step > SAVE_STEPS]
    assert after and all(abs(resumed[step] - straight[step]) < 1e-4 for step in after), (straight, resumed)


def test_a_hang_with_a_spare_node_restarts_in_the_allocation_and_ends_with_the_uninterrupted_weights(
        straight_run, config, tmp_path, monkeypatch):
    """`cluster up --nodes 3`, a job of --nodes 2 --spare-nodes 1: the rank on n2 hangs at step 25 (the bad node;
    the rendezvous decides which rank that is; its spare runs clean). The first node's task restarts the job from step 20 in a new srun step of the same
    allocation on n1 and the spare n3, without a requeue; it ends with the uninterrupted run's weights, the node
    ledger names n2, goodput has no queue after the first start and the restart down under a minute, and the
    notify hook heard `restarted`. Before it, on the same three nodes (one resize for both), a short job whose
    doctor fails on n2 (its torch as another version) restarts on n1 and n3 the same way. The cluster is back at
    two nodes afterwards."""
    from launcher.cli import main
    from launcher.observe import event_ledger
    from launcher.observe.goodput import analyse
    from launcher.observe.node_ledger import NodeLedger

    monkeypatch.setenv("LLAUNCH_HOME", str(tmp_path / "home"))  # no other test's node events quarantine a node
    out, heard = tmp_path / "spare", tmp_path / "notified"
    bad_node = ";".join(f"hang:rank={rank},step=25,node=n2" for rank in (0, 1))
    faults = {"LLAUNCH_FAULT": bad_node, "LLAUNCH_WATCHDOG": "poll_s=0.5,floor_s=5,grace_s=5"}
    assert main(["cluster", "up", "--nodes", "3"]) == 0
    try:
        doctored_out, doctored_id = a_failed_doctor_restarts_on_the_spare(config, tmp_path, monkeypatch)
        monkeypatch.setenv("LLAUNCH_HOME", str(tmp_path / "home"))
        result = submit(out, "--spare-nodes", "1", "--max-restarts", "1", "--wait", "--notify",
                        f'echo "$LLAUNCH_JOB_STATE" >> {heard}', config=config, env=faults, timeout=400)
        job_id = job_id_of(result)
        end = job_state(job_id, os.environ)
        assert result.returncode == 0 and end.state == "COMPLETED" and end.restarts == 0, logs_of(job_id)[-4000:]
        events = event_ledger.read(out)
    finally:
        wait_until(lambda: idle(os.environ), 120, "idle nodes", "(the spare-node job)")
        assert main(["cluster", "up", "--nodes", "2"]) == 0
    launches = [e for e in events if e["kind"] == event_ledger.LAUNCH]
    assert [(e["inc"], e["hosts"]) for e in launches] == [(f"{job_id}.0", ["n1", "n2"]),
                                                           (f"{job_id}.0.1", ["n1", "n3"])], launches
    assert "seconds" not in launches[1]  # a restart inside the allocation waited in no queue
    restart = next(e for e in events if e["kind"] == event_ledger.RESTART)
    assert restart["exclude"] == ["n2"] and "restart 1/1 in the allocation resumes from step 20" in restart["reason"]
    assert [e.host for e in NodeLedger.for_profile("local").events() if e.kind == "hang"] == ["n2"]
    logs = logs_of(job_id)
    assert f"resumed from {out.resolve() / 'checkpoints' / 'step-20'} at step 20" in logs, logs[-4000:]
    straight, resumed = final_weights(straight_run), final_weights(out)
    worst = max(float((straight[k].float() - resumed[k].float()).abs().max()) for k in straight)
    assert worst <= 1e-6, f"the restarted job's weights differ from the uninterrupted run's by {worst}"
    restarted = [piece for piece in analyse(events, alive=False).pieces if piece.lane == 1]
    assert not [piece for piece in restarted if piece.category == "queue"], restarted
    down = sum(piece.seconds for piece in restarted if piece.category == "down")  # from the hang's exit to the step
    assert 0 < down < 60, restarted
    assert json.loads(llaunch("goodput", job_id, "--json").stdout)["seconds"]["down"] == pytest.approx(down, abs=1)
    assert heard.read_text().split() == ["submitted", "started", "hang", "restarted", "completed"]
    assert (doctored_out / "final").is_dir(), logs_of(doctored_id)[-4000:]


def a_failed_doctor_restarts_on_the_spare(config: Path, tmp_path: Path, monkeypatch) -> tuple[Path, str]:
    """A 4-step job of --nodes 2 --spare-nodes 1 whose doctor fails on n2 (a home of its own: n2's doctor event
    would quarantine it for the hang's job): n2's task leaves the decision to the first node, which restarts
    the job on n1 and the spare n3, where it completes, without a requeue. Its output dir and job id."""
    from launcher.observe import event_ledger
    from launcher.observe.node_ledger import NodeLedger

    monkeypatch.setenv("LLAUNCH_HOME", str(tmp_path / "home-doctor"))
    out = tmp_path / "doctored"
    result = llaunch("submit", str(config), *TINY, "--nodes", "2", "--spare-nodes", "1", "--max-restarts", "1",
                     "--max-steps", "4", "--output-dir", str(out), "--wait", timeout=300,
                     env={"LLAUNCH_DOCTOR_FAULT_VERSION": "n2:torch=0.0.0"})
    job_id = job_id_of(result)
    end = job_state(job_id, os.environ)
    assert result.returncode == 0 and end.state == "COMPLETED" and end.restarts == 0, logs_of(job_id)[-4000:]
    events = event_ledger.read(out)
    launches = [(e["inc"], e["hosts"]) for e in events if e["kind"] == event_ledger.LAUNCH]
    assert launches == [(f"{job_id}.0", ["n1", "n2"]), (f"{job_id}.0.1", ["n1", "n3"])], launches
    [restart] = [e for e in events if e["kind"] == event_ledger.RESTART]
    assert restart["exclude"] == ["n2"] and "doctor: software failed on n2: torch 0.0.0 here" in restart["reason"]
    assert [(e.kind, e.host) for e in NodeLedger.for_profile("local").events()] == [("doctor", "n2")]
    assert "rank 0 of 2 starts" in logs_of(job_id)  # torchrun ran in the second step only
    return out, job_id


def test_more_nodes_than_the_partition_has_are_refused_before_sbatch(slurm_cluster, config, tmp_path):
    result = llaunch("submit", str(config), "--nodes", "3", "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr == "llaunch: error: --nodes 3 is more than partition debug can give one job (2); use --nodes 2 or another --partition.\n"
    assert not (tmp_path / "out").exists()


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
    from launcher.jobdir.checkpoint_store import list_checkpoints

    out = tmp_path / "cancelled"
    job_id = job_id_of(submit(out, config=config, env=SIGNAL_ROOM))
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


def test_a_sigkilled_rank_requeues_the_job_which_resumes_from_the_newest_checkpoint(straight_run, config, tmp_path):
    """As the OOM killer or a lost GPU does: rank 1 is SIGKILLed after the step-20 checkpoint. Its peer fails
    with gloo's collateral error; the job is requeued (a node failure), resumes from step 20 and ends with the
    uninterrupted weights; `status` names rank 1 as the rank that failed first, and the node ledger holds one
    event, for rank 1's host."""
    import psutil

    from launcher.observe.node_ledger import NodeLedger
    from launcher.jobdir.checkpoint_store import list_checkpoints

    out = tmp_path / "killed"
    job_id = job_id_of(submit(out, config=config))
    env = load_record(job_id).env()
    wait_until(lambda: any(i.complete and i.step == SAVE_STEPS for i in list_checkpoints(out)), 240,
               f"the step-{SAVE_STEPS} checkpoint", job_id)

    def rank_1() -> psutil.Process | None:
        for proc in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if "launcher.train" in (proc.info["cmdline"] or []) and str(out) in " ".join(proc.info["cmdline"]) \
                        and proc.environ().get("RANK") == "1":
                    return proc
        return None

    victim = wait_until(rank_1, 30, "rank 1", job_id)
    host = victim.environ()["SLURMD_NODENAME"]
    victim.kill()
    wait_until(lambda: (s := job_state(job_id, env)).restarts >= 1 and s.state == "PENDING", 120,
               "the job to requeue itself", job_id)
    release(job_id, env)
    end = wait_until(lambda: (s := job_state(job_id, env)).finished and s, 240, "the requeued job to end", job_id)
    assert end.state == "COMPLETED" and end.restarts == 1, logs_of(job_id)[-4000:]
    logs = logs_of(job_id) + llaunch("logs", job_id, "--rank", "1").stdout
    assert f"requeue: rank 1 on {host} failed first; requeue 1/3 resumes from step {SAVE_STEPS}" in logs, logs[-4000:]
    assert f"resumed from {out.resolve() / 'checkpoints' / f'step-{SAVE_STEPS}'} at step {SAVE_STEPS}" in logs
    straight, resumed = final_weights(straight_run), final_weights(out)
    worst = max(float((straight[k].float() - resumed[k].float()).abs().max()) for k in straight)
    assert worst <= 1e-6, f"resumed weights differ from the uninterrupted run's by {worst}"
    status = llaunch("status", job_id).stdout
    assert f"attempt 1: rank 1 on {host} failed first; the other ranks' errors followed from it" in status, status
    assert f"step {MAX_STEPS}  loss " in status and f"saved: step {MAX_STEPS}" in status, status
    events = NodeLedger.for_profile("local").events()  # a loaded node may add a straggler event beside it
    assert [e.host for e in events if e.job_id == job_id and e.kind == "rank_failed"] == [host], events


def test_a_sigkilled_first_node_task_requeues_the_job_through_the_batch_scripts_teardown(straight_run, config,
                                                                                         tmp_path):
    """The OOM killer takes the first node's task (the one that decides about requeues) after the step-20
    checkpoint: srun ends the step and no task is left to decide. The batch script's teardown
    (cluster.teardown) does: the attempt ends as killed in the job's ledger, its host goes into the node
    ledger, the job is requeued (counted in the pickled task: requeue 1/3), resumes from step 20 and ends with
    the uninterrupted weights; goodput counts the killed incarnation's steps since the save as lost."""
    import psutil

    from launcher.jobdir.checkpoint_store import list_checkpoints
    from launcher.jobdir.layout import JobDir
    from launcher.observe import event_ledger
    from launcher.observe.node_ledger import NodeLedger

    out = tmp_path / "task-killed"
    job_id = job_id_of(submit(out, config=config))
    env = load_record(job_id).env()
    wait_until(lambda: any(i.complete and i.step == SAVE_STEPS for i in list_checkpoints(out)), 240,
               f"the step-{SAVE_STEPS} checkpoint", job_id)

    def first_node_task() -> psutil.Process | None:
        for proc in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                argv = proc.info["cmdline"] or []  # srun's own line names the same module and folder
                if argv[-2:] == ["submitit.core._submit", str(JobDir(out.resolve()).slurm)] and "srun" not in argv[0] \
                        and proc.environ().get("SLURM_PROCID") == "0":
                    return proc
        return None

    victim = wait_until(first_node_task, 30, "the first node's task", job_id)
    host = victim.environ()["SLURMD_NODENAME"]
    victim.kill()
    wait_until(lambda: (s := job_state(job_id, env)).restarts >= 1 and s.state == "PENDING", 120,
               "the teardown to requeue the job", job_id)
    release(job_id, env)
    end = wait_until(lambda: (s := job_state(job_id, env)).finished and s, 240, "the requeued job to end", job_id)
    assert end.state == "COMPLETED" and end.restarts == 1, logs_of(job_id)[-4000:]
    logs = logs_of(job_id) + llaunch("logs", job_id, "--rank", "1").stdout
    assert f"requeue: the node task on {host} died; requeue 1/3 resumes from step {SAVE_STEPS}" in logs, logs[-4000:]
    assert f"resumed from {out.resolve() / 'checkpoints' / f'step-{SAVE_STEPS}'} at step {SAVE_STEPS}" in logs
    straight, resumed = final_weights(straight_run), final_weights(out)
    worst = max(float((straight[k].float() - resumed[k].float()).abs().max()) for k in straight)
    assert worst <= 1e-6, f"resumed weights differ from the uninterrupted run's by {worst}"
    events = NodeLedger.for_profile("local").events()
    assert [e.host for e in events if e.job_id == job_id and e.kind == "rank_failed"] == [host], events
    ended = [(e["inc"], e["cause"]) for e in event_ledger.read(out) if e["kind"] == event_ledger.EXIT]
    assert ended == [(f"{job_id}.0", event_ledger.KILLED), (f"{job_id}.1", "finished")], ended
    report = json.loads(llaunch("goodput", job_id, "--json").stdout)
    assert report["failures"] == 1 and report["seconds"]["lost"] > 0, report  # the killed attempt's steps after 20


def test_a_hang_that_recurs_at_the_first_step_after_the_requeue_is_caught_as_fast(slurm_cluster, config, tmp_path,
                                                                                   monkeypatch):
    """Rank 1 hangs at step 21 in every incarnation: right after the step-20 checkpoint, then at the first step
    of the requeued one. The second is caught by what the first incarnation measured (within a minute), not by
    first_step_s (900 s), and the loop guard ends the job (no progress since the requeue). One node-ledger
    event per hang. A home of its own: the hang quarantines the culprit's host for the other tests."""
    from launcher.observe.node_ledger import NodeLedger

    monkeypatch.setenv("LLAUNCH_HOME", str(tmp_path / "home"))
    faults = {"LLAUNCH_FAULT": f"hang:rank=1,step={SAVE_STEPS + 1}", "LLAUNCH_WATCHDOG": "poll_s=0.5,floor_s=5,grace_s=5"}
    out = tmp_path / "hangs-twice"
    job_id = job_id_of(submit(out, config=config, env=faults))
    env = load_record(job_id).env()
    wait_until(lambda: (s := job_state(job_id, env)).restarts >= 1 and s.state == "PENDING", 240,
               "the hung job to requeue itself", job_id)
    release(job_id, env)
    released, released_wall = time.monotonic(), time.time()
    end = wait_until(lambda: (s := job_state(job_id, env)).finished and s, 120, "the second hang to end the job",
                     job_id)
    assert end.state == "FAILED" and end.restarts == 1, logs_of(job_id)[-4000:]
    assert time.monotonic() - released < 90
    # One record per hang, or one from each node when both saw it at once; every one names rank 1.
    records = [json.loads(p.read_text()) for p in sorted(out.glob("hangs/*/evidence.json"))]
    assert all(r["culprit"]["rank"] == 1 and r["nodes_answered"] == "2 of 2" for r in records), records
    first, second = ([r for r in records if (r["time"] > released_wall) == after] for after in (False, True))
    assert 1 <= len(first) <= 2 and 1 <= len(second) <= 2, records
    assert max(t for r in second for t in r["timeouts_s"].values()) < 60, second
    status = llaunch("status", job_id).stdout
    assert "no progress since the last requeue" in status and "hang: rank 1 on " in status, status
    hangs = [e for e in NodeLedger.for_profile("local").events() if e.kind == "hang"]  # beside stragglers, if any
    assert sorted(e.host for e in hangs) == sorted(r[0]["culprit"]["host"] for r in (first, second)), (hangs, records)


def test_cluster_down_ends_the_jobs_before_it_stops(straight_run, config, tmp_path):
    """Last in this file: slurmd's job steps outlive slurmd, so `down` must end the jobs first."""
    import psutil

    out = tmp_path / "down"
    job_id = job_id_of(submit(out, config=config))

    def ranks() -> list[psutil.Process]:
        return [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])
                and "launcher.train" in p.info["cmdline"]]

    wait_until(ranks, 180, "the ranks to start", job_id)
    try:
        result = llaunch("cluster", "down", timeout=200)
        assert result.returncode == 0 and result.stdout.startswith("stopped: "), result.stderr
        assert not ranks()
        # A zombie has ended and only waits for its parent to reap it: no job step is left running.
        assert not [p for p in psutil.process_iter(["name", "status"])
                    if p.info["name"] == "slurmstepd" and p.info["status"] != psutil.STATUS_ZOMBIE]
    finally:
        assert llaunch("cluster", "up").returncode == 0  # as the session found it

