"""The text `llaunch submit` hands to SLURM: sbatch scripts and per-node torchrun commands, golden-tested,
plus the requeue policy and the parsers `llaunch status` relies on.

Regenerate the goldens after an intended change with LLAUNCH_UPDATE_GOLDEN=1 and read the diff.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest

from cluster.jobs import JobRecord, last_error, last_metrics, parse_scontrol_job
from cluster.profile import ClusterProfile, load_profile, profile_names, time_to_minutes
from cluster.requeue import decide_requeue
from cluster.submission import (
    job_name,
    node_command,
    render_node_command,
    render_sbatch,
    rendezvous_port,
    slurm_parameters,
)
from launcher.errors import LaunchError
from launcher.plan import Plan

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
    script = render_sbatch(slurm_parameters(profile, "llaunch-demo"), f"{JOB_DIR}/slurm", PYTHON)
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


def test_rendezvous_port_comes_from_the_job_id_and_stays_in_range():
    assert rendezvous_port("123") == rendezvous_port(123) == 20123
    assert rendezvous_port("10123") == 20123  # wraps: ports 20000-29999 only
    assert rendezvous_port("77_3") == 20077  # array task ids use the parent job id
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
    args = dict(stop_signal="SIGUSR2", requeues_done=0, max_requeues=3, step=20, step_at_last_requeue=None) | kwargs
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
    quickstart = Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml"
    code = main(["submit", str(quickstart), "data.max_train_bytes=200000", "--cluster", "example-h100",
                 "--nodes", "3", "--time", "02:00:00", "--output-dir", str(out), "--dry-run"])
    printed = capsys.readouterr().out
    assert code == 0
    for line in ("#SBATCH --nodes=3", "#SBATCH --gpus-per-node=8", "#SBATCH --account=my-project",
                 "#SBATCH --time=120", "#SBATCH --signal=USR2@300", "#SBATCH --requeue", "module load cuda/12.4 nccl"):
        assert line in printed, line
    node_line = next(line for line in printed.splitlines() if "launcher.torchrun" in line)
    words = shlex.split(node_line)
    assert words[words.index("--nnodes") + 1] == "3" and words[words.index("--nproc-per-node") + 1] == "8"
    assert words[words.index("--rdzv-endpoint") + 1] == "FIRST_NODE:RDZV_PORT"
    assert Plan.load(out / "plan.yaml").nodes == 3
    assert not (out / "slurm").exists() and not (tmp_path / "home").exists()


def test_an_allocation_that_differs_from_the_plan_is_refused_before_training():
    from cluster.executor import TrainingError, check_allocation

    check_allocation(_plan(2, 8, "cuda"), ["gpu-a01", "gpu-a02"], gpus_on_node=8)
    check_allocation(_plan(2, 1, "cpu"), ["n1", "n2"], gpus_on_node=0)
    with pytest.raises(TrainingError, match="got 1 node"):
        check_allocation(_plan(2, 8, "cuda"), ["gpu-a01"], gpus_on_node=8)
    with pytest.raises(TrainingError, match="sees 4 GPU"):
        check_allocation(_plan(2, 8, "cuda"), ["gpu-a01", "gpu-a02"], gpus_on_node=4)
