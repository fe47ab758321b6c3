"""The text `llaunch submit` hands to SLURM: sbatch scripts and per-node torchrun commands, golden-tested,
plus the requeue policy and the parsers `llaunch status` relies on.

Regenerate the goldens after an intended change with LLAUNCH_UPDATE_GOLDEN=1 and read the diff.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

from cluster.jobs import JobRecord, last_error, parse_scontrol_job
from launcher.observe.metrics_file import last_metrics
from cluster.profile import ClusterProfile, Container, load_profile, profile_names, time_to_minutes
from cluster.requeue import decide_requeue
from cluster.submission import (
    ARRAY_TASK_PORT_STRIDE,
    ContainerJob,
    job_name,
    node_command,
    render_node_command,
    render_sbatch,
    rendezvous_port,
    slurm_parameters,
    training_parameters,
)
from launcher.errors import LaunchError
from launcher.planning.plan import Plan

GOLDEN = Path(__file__).parent / "golden" / "slurm"
JOB_DIR = "/shared/runs/demo"
PYTHON = "/opt/venv/bin/python"

CPU_1 = ClusterProfile(name="local", partition="debug", time="00:30:00", nodes=1, cpus_per_task=2)
CPU_2 = ClusterProfile(name="local", partition="debug", time="00:30:00", nodes=2, cpus_per_task=1)
GPU_2 = ClusterProfile(
    name="h100", partition="gpu", account="proj-42", qos="high", time="1-00:00:00", constraint="h100", nodes=2,
    gpus_per_node=8, cpus_per_task=96, mem_gb=800, signal_delay_s=300, max_restarts=1, dist_timeout_s=600,
    setup=["module load cuda/12.4"],
)


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("LLAUNCH_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"golden {path} missing; create it with LLAUNCH_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} differs from its golden file"


def _plan(nodes: int, gpus_per_node: int, device: str) -> Plan:
    return Plan(model="llama-tiny", strategy="fsdp" if device == "cuda" else "ddp", nodes=nodes,
                gpus_per_node=gpus_per_node, device=device, precision="bf16" if device == "cuda" else "fp32",
                seq_len=64, micro_batch=2).validate()


@pytest.mark.parametrize("name,profile", [("sbatch_1node_cpu.sh", CPU_1), ("sbatch_2node_cpu.sh", CPU_2),
                                          ("sbatch_2node_gpu.sh", GPU_2)])
def test_sbatch_script_matches_golden(name, profile):
    folder = f"{JOB_DIR}/slurm"
    script = render_sbatch(training_parameters(profile, "llaunch-demo", folder, PYTHON), folder, PYTHON)
    _check_golden(name, script)


def test_sbatch_script_asks_for_one_task_per_node_requeue_and_usr2_before_the_limit():
    script = render_sbatch(slurm_parameters(GPU_2, "demo"), f"{JOB_DIR}/slurm", PYTHON).splitlines()
    for flag in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--requeue", "--signal=USR2@300",
                 "--time=1440", "--partition=gpu", "--account=proj-42", "--qos=high", "--constraint=h100"):
        assert f"#SBATCH {flag}" in script, flag
    assert "module load cuda/12.4" in script
    srun = next(line for line in script if line.startswith("srun "))
    assert "--kill-on-bad-exit=1" in shlex.split(srun)


@pytest.mark.parametrize("nodes,gpus,device,golden", [
    (1, 1, "cpu", "torchrun_1node_cpu.txt"), (2, 1, "cpu", "torchrun_2node_cpu.txt"),
    (1, 8, "cuda", "torchrun_1node_gpu.txt"), (2, 8, "cuda", "torchrun_2node_gpu.txt"),
])
def test_node_torchrun_command_matches_golden(nodes, gpus, device, golden):
    argv, env = node_command(_plan(nodes, gpus, device), JOB_DIR, rdzv_host="gpu-a01", rdzv_port=rendezvous_port("4242"),
                             job_id="4242", max_restarts=1, dist_timeout_s=600, cpus_per_node=16, python=PYTHON)
    assert argv[argv.index("--nnodes") + 1] == str(nodes)
    assert argv[argv.index("--nproc-per-node") + 1] == str(gpus)
    assert argv[argv.index("--rdzv-endpoint") + 1] == "gpu-a01:24242"
    assert argv[argv.index("--rdzv-id") + 1] == "4242" and argv[argv.index("--max-restarts") + 1] == "1"
    assert env["LLAUNCH_DIST_TIMEOUT_S"] == "600" and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    _check_golden(golden, render_node_command(argv, env) + "\n")


PYXIS = Container(image="nvcr.io#nvidia/pytorch:24.05-py3", mounts=("/datasets:/datasets:ro",), workdir="/workspace")
APPTAINER = Container(image="/images/train.sif", runtime="apptainer", mounts=("/datasets:/data:ro",))


def _container_job(container: Container) -> ContainerJob:
    return ContainerJob(container, JOB_DIR, "/shared/cache", source="/opt/llaunch")


def test_a_pyxis_container_goes_on_the_srun_line_and_the_step_runs_the_images_python():
    from cluster.submission import step_python

    job = _container_job(PYXIS)
    folder = f"{JOB_DIR}/slurm"
    script = render_sbatch(training_parameters(GPU_2, "llaunch-demo", folder, PYTHON, job), folder, step_python(job, PYTHON))
    _check_golden("sbatch_2node_gpu_pyxis.sh", script)
    srun = shlex.split(next(line for line in script.splitlines() if line.startswith("srun ")))
    assert "--container-image=nvcr.io#nvidia/pytorch:24.05-py3" in srun and "--container-workdir=/workspace" in srun
    mounts = next(w for w in srun if w.startswith("--container-mounts=")).split("=", 1)[1].split(",")
    assert mounts == [f"{JOB_DIR}:{JOB_DIR}", "/opt/llaunch:/opt/llaunch:ro", "/shared/cache:/shared/cache",
                      "/datasets:/datasets:ro"]
    assert srun[srun.index("-u") - 1] == "python3"  # the image's interpreter, not the login node's
    assert "export LLAUNCH_CACHE=/shared/cache PYTHONPATH=/opt/llaunch" in script.splitlines()
    argv, _ = node_command(_plan(2, 8, "cuda"), JOB_DIR, rdzv_host="gpu-a01", rdzv_port=24242, job_id="4242",
                           max_restarts=1, dist_timeout_s=600, wrap=job.wrap(gpus=True))
    assert argv[0] == "python"  # pyxis already runs the node task in the image: torchrun is not wrapped


def test_an_apptainer_container_wraps_each_nodes_torchrun_and_leaves_the_sbatch_script_alone():
    job = _container_job(APPTAINER)
    folder = f"{JOB_DIR}/slurm"
    script = render_sbatch(training_parameters(GPU_2, "llaunch-demo", folder, PYTHON, job), folder, PYTHON)
    assert script == (GOLDEN / "sbatch_2node_gpu.sh").read_text()
    argv, env = node_command(_plan(2, 8, "cuda"), JOB_DIR, rdzv_host="gpu-a01", rdzv_port=rendezvous_port("4242"),
                             job_id="4242", max_restarts=1, dist_timeout_s=600, cpus_per_node=16, python="python3",
                             wrap=job.wrap(gpus=True))
    _check_golden("torchrun_2node_gpu_apptainer.txt", render_node_command(argv, env) + "\n")
    image = argv.index("/images/train.sif")
    assert argv[:3] == ["apptainer", "exec", "--nv"] and argv[image + 1:image + 4] == ["python3", "-m",
                                                                                      "launcher.runtime.torchrun"]
    assert [argv[i + 1] for i, word in enumerate(argv[:image]) if word == "--bind"][-1] == "/datasets:/data:ro"
    assert "--nv" not in job.wrap(gpus=False)  # CPU nodes: no GPU libraries to bring in


def test_hostile_container_values_stay_single_shell_words():
    image = "/images/a b;$(touch /tmp/pwned).sif"
    for runtime in ("pyxis", "apptainer"):
        job = ContainerJob(Container(image=image, runtime=runtime), "/runs/$(id)", "/c `id`", source="/opt/l l")
        script = render_sbatch(slurm_parameters(CPU_2, "demo", job), f"{JOB_DIR}/slurm", PYTHON)
        argv, env = node_command(_plan(2, 1, "cpu"), "/runs/$(id)", rdzv_host="n1", rdzv_port=20001, job_id="1",
                                 max_restarts=0, dist_timeout_s=60, wrap=job.wrap(gpus=False))
        words = shlex.split(render_node_command(argv, env)) + shlex.split(script.split("# command")[1])
        assert image in words or f"--container-image={image}" in words
        assert ("PYTHONPATH=/opt/l l" in words) == (runtime == "apptainer")
        assert ("export LLAUNCH_CACHE='/c `id`' PYTHONPATH='/opt/l l'" in script) == (runtime == "pyxis")


def test_rendezvous_port_comes_from_the_job_id_and_stays_in_range():
    assert rendezvous_port("123") == rendezvous_port(123) == 20123
    assert rendezvous_port("10123") == 20123  # wraps: ports 20000-29999 only
    # a sweep's elements (array tasks) may run side by side on one host: each has its own block of ports, its
    # rendezvous port and the doctor's one per node after it
    assert rendezvous_port("77_0") == 20077 and rendezvous_port("77_3") == 20077 + 3 * ARRAY_TASK_PORT_STRIDE
    blocks = [set(range(rendezvous_port(f"77_{task}"), rendezvous_port(f"77_{task}") + 1 + 7)) for task in range(3)]
    assert not (blocks[0] & blocks[1]) and not (blocks[1] & blocks[2])  # up to 7 nodes each
    assert rendezvous_port("4242") != rendezvous_port("4243")


def test_job_name_cannot_carry_shell_or_a_new_line():
    assert job_name("llama 7b; rm -rf ~\n$(reboot)") == "llama-7b-rm-rf-reboot"
    assert job_name("'\"`") == "llaunch"
    script = render_sbatch(slurm_parameters(CPU_2, "x\ntouch /tmp/pwned"), f"{JOB_DIR}/slurm", PYTHON)
    assert "touch /tmp/pwned" not in script
    assert "#SBATCH --job-name=x-touch-tmp-pwned" in script


def test_hostile_values_stay_single_shell_words():
    folder = "/runs/a b/$(touch /tmp/pwned)/`id`;'q'/slurm"
    profile = ClusterProfile(partition="gpu;reboot", account="$(id)", time="00:10:00", nodes=2)
    script = render_sbatch(slurm_parameters(profile, "demo"), folder, "/opt/my env/bin/python")
    sbatch = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            (word,) = shlex.split(line[len("#SBATCH "):])  # exactly one word per directive
            key, _, value = word.partition("=")
            sbatch[key] = value
        elif line and not line.startswith("#"):
            words = shlex.split(line)
            if words[0] == "srun":
                assert words[words.index("--output") + 1] == f"{folder}/%j_%t_log.out"
                assert words[-1] == folder and "/opt/my env/bin/python" in words
    assert sbatch["--partition"] == "gpu;reboot" and sbatch["--account"] == "$(id)"
    assert sbatch["--output"] == f"{folder}/%j_0_log.out"


def test_values_with_a_line_break_are_refused():
    with pytest.raises(LaunchError, match="line break"):
        slurm_parameters(ClusterProfile(partition="gpu\n#SBATCH --qos=free", nodes=1), "demo")
    with pytest.raises(LaunchError, match="line break"):
        render_sbatch(slurm_parameters(CPU_1, "demo"), "/runs/x\ntouch y", PYTHON)


def test_shipped_profiles_load_and_flags_override_them():
    assert {"local", "example-h100"} <= set(profile_names())
    local = load_profile("local")
    assert local.local and local.nodes == 2 and local.gpus_per_node == 0
    gpu = load_profile("example-h100").replace(nodes=4, partition=None, time="02:00:00")
    assert (gpu.nodes, gpu.partition, gpu.time_minutes, gpu.gpus_per_node) == (4, "gpu", 120, 8)
    with pytest.raises(LaunchError, match="not found"):
        load_profile("no-such-cluster")
    with pytest.raises(LaunchError, match="HH:MM:SS"):
        load_profile("local").replace(time="90 minutes")


@pytest.mark.parametrize("field,value,message", [
    ("node_ram_gb", "lots", "cluster profile 'mine': node_ram_gb must be the host RAM of one node in GB"),
    ("node_ram_gb", None, "node_ram_gb must be the host RAM"),  # missing: the field is named, not "0 B available"
    ("setup", "module load x", "setup must be a list of shell lines"),
    ("time", "00:00:30", "time must be longer than the preemption warning (signal_delay_s 90 s"),
    ("partition", 7, "partition must be a name"),
    ("time", "99:99:99", "time must be [D-]HH:MM:SS with minutes and seconds below 60"),
    ("time", "1-25:00:00", "time must be [D-]HH:MM:SS with minutes and seconds below 60"),
    ("dist_timeout_s", 0, "dist_timeout_s must be a positive integer"),  # every collective would time out
    ("nodes", True, "nodes must be a positive integer"),
    ("container", "ubuntu", "'mine': container must be a mapping of image, runtime, mounts, workdir and python"),
    ("container", {"image": "/i.sif", "mounts": ["/a:/b:rw"]}, "container.mounts must be a list of SRC:DST or"),
    ("container", {"image": "/i.sif", "mounts": ["/a:/b,/c:/d"]}, "container.mounts must be a list of SRC:DST or"),
    ("container", {"image": "/i.sif", "workdir": "work"}, "container.workdir must be an absolute path inside the"),
    ("container", {"image": ""}, "container.image must be a non-empty value on one line"),
    ("container", {"image": "/i.sif", "python": 3}, "container.python must be a non-empty value on one line"),
])
def test_profile_fields_are_checked_by_type_and_named(tmp_path, field, value, message):
    data = yaml.safe_load((Path(__file__).resolve().parents[2] / "cluster/profiles/local.yaml").read_text())
    data["name"] = "mine"
    if value is None:
        del data[field]
    else:
        data[field] = value
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(LaunchError, match=re.escape(message)):
        load_profile(str(path))


def test_a_bad_flag_is_named_as_the_flag_not_as_the_profile():
    with pytest.raises(LaunchError, match="^--nodes must be a positive integer"):
        load_profile("local").replace(nodes=0)
    with pytest.raises(LaunchError, match="^--time must be longer than the preemption warning.*e.g. 00:04:00"):
        load_profile("local").replace(time="00:02:00")


def test_time_limits_round_up_to_whole_minutes():
    assert time_to_minutes("00:30:00") == 30
    assert time_to_minutes("00:00:01") == 1
    assert time_to_minutes("2-01:00:00") == 2 * 24 * 60 + 60


@pytest.mark.parametrize("kwargs,requeue,why", [
    (dict(), True, "SIGUSR2 received; requeue 1/3 resumes from step 20"),
    (dict(requeues_done=3), False, "max-requeues"),
    (dict(requeues_done=1, step_at_last_requeue=20), False, "no progress"),
    (dict(requeues_done=1, step_at_last_requeue=10), True, "requeue 2/3"),
    (dict(step=None), True, "no checkpoint yet"),
    (dict(requeues_done=1, step=None), False, "no progress"),
])
def test_requeue_policy(kwargs, requeue, why):
    args = dict(cause="SIGUSR2 received", requeues_done=0, max_requeues=3, step=20, step_at_last_requeue=None) | kwargs
    decision = decide_requeue(**args)
    assert decision.requeue is requeue
    assert why in decision.reason


def test_scontrol_job_parsing_reads_state_restarts_and_nodes():
    line = ("JobId=17 JobName=llaunch-quickstart UserId=root(0) JobState=PENDING Reason=BeginTime "
            "Requeue=1 Restarts=2 BatchFlag=1 ExitCode=0:0 NodeList=(null) NumNodes=2-2 "
            "StdOut=/runs/a/slurm/17_0_log.out")
    fields = parse_scontrol_job(line)
    assert fields["JobState"] == "PENDING" and fields["Restarts"] == "2" and fields["Reason"] == "BeginTime"
    assert fields["StdOut"] == "/runs/a/slurm/17_0_log.out"


@pytest.mark.parametrize("code, shown", [("0:0", ""), ("1:0", "1:0"), ("0:9", "0:9"), ("", "")])
def test_status_names_an_exit_code_only_when_something_went_wrong(code, shown):
    from cluster.jobs import JobState

    assert JobState(state="COMPLETED", exit_code=code).failed_exit == shown


def test_last_metrics_and_last_error_read_what_status_shows(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"step": 10, "loss": 6.5}) + "\n" + json.dumps({"step": 20, "loss": 5.25, "lr": 1e-3}) + "\n"
        + json.dumps({"step": 20, "eval_loss": 5.5}) + "\n" + '{"step": 21, "lo'  # a line being written
    )
    assert last_metrics(tmp_path) == {"step": 20, "loss": 5.25, "lr": 1e-3}
    assert last_metrics(tmp_path / "nothing") is None
    log = tmp_path / "7_0_log.err"
    log.write_text("Traceback (most recent call last):\n  File \"x.py\", line 3\n"
                   "[rank0]: ValueError: data line 12 of train.jsonl has no 'text' field\n"
                   "srun: error: n1: task 0: Exited with exit code 1\n")
    assert last_error([log, tmp_path / "missing.err"]) == "ValueError: data line 12 of train.jsonl has no 'text' field"
    wrapper = tmp_path / "7_0_log.out"
    wrapper.write_text("torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
                       "cluster.executor.TrainingError: torchrun exited with code 1 on n1\n")
    assert last_error([log, wrapper]) == "ValueError: data line 12 of train.jsonl has no 'text' field"
    assert last_error([wrapper]) == "cluster.executor.TrainingError: torchrun exited with code 1 on n1"
    log.write_text("[rank1]: llaunch: error: line 3 of bad.jsonl is not JSON; fix or remove it.\n")
    assert last_error([log, wrapper]) == "llaunch: error: line 3 of bad.jsonl is not JSON; fix or remove it."


def test_last_error_is_the_jobs_own_reason_from_its_newest_attempt(tmp_path):
    import os

    node0_out, node0, node1 = tmp_path / "8_0_log.out", tmp_path / "8_0_log.err", tmp_path / "8_1_log.err"
    node0_out.write_text("[llaunch] node 0/2 (n1), attempt 2: torchrun ...\n")
    node0.write_text("[llaunch] attempt 1\n[rank0]: llaunch: error: an error of the first attempt.\n"
                     "[llaunch] attempt 2\n"
                     "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
                     "cluster.executor.TrainingError: job stopped by SIGUSR2 and not requeued: no progress since "
                     "the last requeue (newest checkpoint still at step 20)\n")
    node1.write_text("[llaunch] attempt 2\ntorch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n")
    os.utime(node0, (1, 1))  # node 1's log is the newer file: the order of files must not matter
    assert last_error([node0_out, node0, node1]) == ("job stopped by SIGUSR2 and not requeued: no progress since "
                                                     "the last requeue (newest checkpoint still at step 20)")
    node0.write_text("[llaunch] attempt 1\n[rank0]: torch.distributed.DistBackendError: Timed out waiting 300000ms "
                     "for recv operation to complete\n")
    node1.write_text("[llaunch] attempt 1\ntorch.distributed.elastic.rendezvous.api.RendezvousConnectionError: The "
                     "connection to the C10d store has failed.\n")
    assert last_error([node0, node1]).startswith("torch.distributed.DistBackendError: Timed out")


def test_a_ranks_error_outranks_the_sigterm_slurm_sent_the_other_node_because_of_it(tmp_path):
    # Node 1's rank refuses a damaged checkpoint; SLURM then ends the step, so node 0's task reports SIGTERM.
    node0, node1 = tmp_path / "9_0_log.err", tmp_path / "9_1_log.err"
    node1.write_text("[llaunch] attempt 1\n[rank1]: llaunch: error: checkpoint step-20 is damaged; delete it.\n"
                     "cluster.executor.TrainingError: torchrun exited with code 1 on n2; the rank's error is above.\n")
    node0.write_text("[llaunch] attempt 1\ncluster.executor.TrainingError: stopped by SIGTERM with the newest "
                     "checkpoint at step 20; a preempted job comes back through SLURM, a cancelled one ends here\n")
    assert last_error([node0, node1]) == "llaunch: error: checkpoint step-20 is damaged; delete it."
    node1.write_text("[llaunch] attempt 1\n")
    assert last_error([node0, node1]).startswith("stopped by SIGTERM with the newest checkpoint at step 20")


def test_logs_find_a_rank_by_the_line_it_printed_not_by_the_node_order(tmp_path, monkeypatch):
    from cluster.jobs import node_of_rank

    record = JobRecord(job_id="9", name="demo", output_dir=str(tmp_path), log_folder=str(tmp_path), nodes=2,
                       cluster="local")
    (tmp_path / "9_0_log.out").write_text("[llaunch] node 0/2 (n1), attempt 1: ...\n[llaunch] rank 0 of 2 starts\n"
                                          "[llaunch] node 0/2 (n1), attempt 2: ...\n[llaunch] rank 1 of 2 starts\n")
    (tmp_path / "9_1_log.out").write_text("[llaunch] node 1/2 (n2), attempt 1: ...\n[llaunch] rank 1 of 2 starts\n"
                                          "[llaunch] node 1/2 (n2), attempt 2: ...\n[llaunch] rank 0 of 2 starts\n")
    assert (node_of_rank(record, 0), node_of_rank(record, 1)) == (1, 0)
    assert node_of_rank(JobRecord("10", "x", str(tmp_path), str(tmp_path), 2, "local"), 0) is None


def test_wait_reports_a_job_slurm_will_never_start_instead_of_waiting_forever(monkeypatch):
    import cluster.jobs as jobs

    states = iter([jobs.JobState("PENDING", reason="Priority"), jobs.JobState("PENDING", reason="PartitionNodeLimit")])
    monkeypatch.setattr(jobs, "job_state", lambda job_id, env: next(states))
    with pytest.raises(LaunchError, match=r"^job 12 can never start as the cluster is configured \(PartitionNodeLimit"):
        jobs.wait_for_end("12", {}, poll_s=0)


def test_job_record_points_at_per_node_logs(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAUNCH_HOME", str(tmp_path))
    record = JobRecord(job_id="31", name="demo", output_dir="/runs/demo", log_folder="/runs/demo/slurm", nodes=2,
                       cluster="local", slurm_conf="/tmp/llaunch-slurm/slurm.conf")
    record.save()
    from cluster.jobs import load_record

    loaded = load_record()
    assert loaded == record and loaded.env()["SLURM_CONF"] == "/tmp/llaunch-slurm/slurm.conf"
    assert [p.name for p in loaded.log_paths(1)] == ["31_1_log.out", "31_1_log.err"]
    with pytest.raises(LaunchError, match="no record"):
        load_record("32")


def test_dry_run_prints_script_and_node_command_and_submits_nothing(tmp_path, monkeypatch, capsys):
    from launcher.cli import main

    monkeypatch.setenv("LLAUNCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "no-cluster" / "slurm.conf"))  # no SLURM needed
    out = tmp_path / "run"
    out.mkdir()  # a running job's dir: it rereads config.yaml and plan.yaml when it is requeued
    for name in ("config.yaml", "plan.yaml"):
        (out / name).write_text("the running job's\n")
    quickstart = tmp_path / "quickstart.yaml"  # outside git: llaunch alone is frozen, whatever the checkout holds
    quickstart.write_text((Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml").read_text())
    code = main(["submit", str(quickstart), "data.max_train_bytes=200000", "--cluster", "example-h100",
                 "--nodes", "3", "--time", "02:00:00", "--output-dir", str(out), "--dry-run"])
    printed = capsys.readouterr().out
    assert code == 0
    for line in ("#SBATCH --nodes=3", "#SBATCH --gpus-per-node=8", "#SBATCH --account=my-project",
                 "#SBATCH --time=120", "#SBATCH --signal=USR2@300", "#SBATCH --requeue", "module load cuda/12.4 nccl"):
        assert line in printed, line
    node_line = next(line for line in printed.splitlines() if "launcher.runtime.torchrun" in line)
    words = shlex.split(node_line)
    assert words[words.index("--nnodes") + 1] == "3" and words[words.index("--nproc-per-node") + 1] == "8"
    assert words[words.index("--rdzv-endpoint") + 1] == "FIRST_NODE:RDZV_PORT"
    assert Plan.from_dict(yaml.safe_load(printed.split("when submitted):\n")[1].split("\n# nothing written")[0])).nodes == 3
    assert f"cd {out / 'code' / 'llaunch'}" in printed.splitlines()  # every node starts in the frozen code
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "plan.yaml"]
    assert {(out / name).read_text() for name in ("config.yaml", "plan.yaml")} == {"the running job's\n"}
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize("runtime", ["pyxis", "apptainer"])
def test_dry_run_shows_the_profiles_container_with_the_job_dir_code_and_cache_mounted(tmp_path, monkeypatch, capsys,
                                                                                        runtime):
    from cluster.submission import LLAUNCH_SOURCE
    from launcher.cli import main

    monkeypatch.setenv("LLAUNCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "no-cluster" / "slurm.conf"))
    profile = yaml.safe_load((Path(LLAUNCH_SOURCE) / "cluster/profiles/example-h100.yaml").read_text())
    profile["container"] = {"runtime": runtime, "image": "/images/train.sqsh", "mounts": ["/datasets:/datasets:ro"]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(profile))
    quickstart = tmp_path / "quickstart.yaml"
    quickstart.write_text((Path(LLAUNCH_SOURCE) / "examples" / "quickstart.yaml").read_text())
    out, cache = tmp_path / "run", tmp_path / "cache"
    assert main(["submit", str(quickstart), f"data.cache_dir={cache}", "--cluster", str(tmp_path / "c.yaml"),
                 "--output-dir", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    frozen = out / "code" / "llaunch"  # the job's copy of llaunch, which the image's python imports
    binds = [f"{out}:{out}", f"{frozen}:{frozen}:ro", f"{cache}:{cache}", "/datasets:/datasets:ro"]
    srun = shlex.split(next(line for line in printed.splitlines() if line.startswith("srun ")))
    node = shlex.split(next(line for line in printed.splitlines() if "launcher.runtime.torchrun" in line))
    if runtime == "pyxis":
        assert "--container-image=/images/train.sqsh" in srun and f"--container-mounts={','.join(binds)}" in srun
        assert "python3" in srun and node[node.index("-m") - 1] == "python3" and "apptainer" not in node
    else:
        assert not any(word.startswith("--container") for word in srun)
        assert node[node.index("apptainer"):node.index("apptainer") + 3] == ["apptainer", "exec", "--nv"]
        assert [node[i + 1] for i, word in enumerate(node) if word == "--bind"] == binds
        assert node[node.index("/images/train.sqsh") + 1] == "python3"
    assert not out.exists() and not (tmp_path / "home").exists()


def test_ctrl_c_on_wait_says_the_job_keeps_running(tmp_path, monkeypatch, capsys):
    import types

    import cluster.executor
    import cluster.slurm_checks
    import cluster.jobs
    import cluster.sbatch
    from launcher.cli import main

    def interrupted(job_id, env):
        raise KeyboardInterrupt

    monkeypatch.setenv("LLAUNCH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(cluster.slurm_checks, "slurm_reachable", lambda env: None)
    monkeypatch.setattr(cluster.slurm_checks, "check_partition", lambda profile, env: None)
    monkeypatch.setattr(cluster.sbatch, "submit", lambda *args: types.SimpleNamespace(job_id="77"))
    monkeypatch.setattr(cluster.jobs, "wait_for_end", interrupted)
    quickstart = tmp_path / "quickstart.yaml"
    quickstart.write_text((Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml").read_text())
    code = main(["submit", str(quickstart), "data.max_train_bytes=200000", "--output-dir", str(tmp_path / "run"),
                 "--wait"])
    assert code == 130
    assert "stopped waiting; job 77 keeps running (`llaunch status 77`, `llaunch cancel 77`)." in capsys.readouterr().out


def test_an_allocation_that_differs_from_the_plan_is_refused_before_training():
    from cluster.executor import TrainingError, check_allocation

    check_allocation(_plan(2, 8, "cuda"), ["gpu-a01", "gpu-a02"], gpus_on_node=8)
    check_allocation(_plan(2, 1, "cpu"), ["n1", "n2"], gpus_on_node=0)
    with pytest.raises(TrainingError, match="got 1 node"):
        check_allocation(_plan(2, 8, "cuda"), ["gpu-a01"], gpus_on_node=8)
    with pytest.raises(TrainingError, match="sees 4 GPU"):
        check_allocation(_plan(2, 8, "cuda"), ["gpu-a01", "gpu-a02"], gpus_on_node=4)


def test_min_nodes_asks_sbatch_for_a_range_and_a_smaller_allocation_keeps_the_global_batch():
    from cluster.executor import TrainingError, check_allocation

    script = render_sbatch(slurm_parameters(dataclasses.replace(CPU_2, min_nodes=1), "demo"), f"{JOB_DIR}/slurm", PYTHON)
    assert "#SBATCH --nodes=1-2" in script.splitlines() and "--nodes=2" not in script
    assert "#SBATCH --ntasks-per-node" not in script and "--kill-on-bad-exit=1 --ntasks-per-node=1" in script
    plan = _plan(4, 8, "cuda")  # a global batch of 2 x 1 x 32 = 64
    smaller = check_allocation(plan, ["a", "b"], gpus_on_node=8, min_nodes=2)
    assert (smaller.nodes, smaller.gradient_accumulation_steps, smaller.global_batch) == (2, 2, 64)
    assert check_allocation(plan, ["a", "b", "c", "d"], gpus_on_node=8) == plan
    with pytest.raises(TrainingError, match="got 1 node"):
        check_allocation(plan, ["a"], gpus_on_node=8, min_nodes=2)
    with pytest.raises(LaunchError, match="global batch of 64 does not split into micro-batches of 2 over 3"):
        plan.on_nodes(3)
    with pytest.raises(LaunchError, match="--min-nodes must be an integer from 1 to the job's nodes"):
        dataclasses.replace(CPU_2, node_ram_gb=4).replace(min_nodes=3)
