"""`llaunch run`: bad configs stop before any process starts; --dry-run shows the command; Ctrl-C leaves no orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from launcher.cli import main
from launcher.errors import LaunchError
from launcher.jobdir.run_lock import RunLock
from tests.tiny_run import tiny_run_config


@pytest.fixture
def tiny_config(tmp_path):
    return tiny_run_config(tmp_path, training={"max_steps": 3})


def run_cli(capsys, *argv):
    code = main(["run", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_dry_run_plans_writes_the_job_and_prints_torchrun(tmp_path, tiny_config, capsys):
    out_dir = tmp_path / "out"
    code, out, _ = run_cli(capsys, tiny_config, "--output-dir", out_dir, "--dry-run", "--strategy", "zero2",
                           "--nproc-per-node", "2", "training.learning_rate=1e-3")
    assert code == 0
    assert "DS_ACCELERATOR=cpu" in out and "launcher.runtime.torchrun --signals-to-handle SIGINT,SIGHUP,SIGQUIT --standalone" in out
    assert f"--nproc-per-node 2 --max-restarts 0 -m launcher.train --job-dir {out_dir}" in out
    plan = yaml.safe_load((out_dir / "plan.yaml").read_text())
    assert (plan["strategy"], plan["device"], plan["gpus_per_node"], plan["seq_len"]) == ("zero2", "cpu", 2, 32)
    config = yaml.safe_load((out_dir / "config.yaml").read_text())
    assert config["training"]["learning_rate"] == 1e-3 and config["parallel"]["strategy"] == "zero2"
    assert config["data"]["train_files"] == [str(tmp_path / "corpus.txt")]


def test_threads_per_rank_follow_the_cores_this_process_may_use(tmp_path, tiny_config, capsys, monkeypatch):
    """Under taskset or a SLURM cpuset os.cpu_count() still counts every core of the machine; the ranks' intra-op
    threads must split only the cores the launch may use, or they oversubscribe them."""
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    code, out, _ = run_cli(capsys, tiny_config, "--output-dir", tmp_path / "out", "--dry-run", "--nproc-per-node", "2")
    assert code == 0 and "OMP_NUM_THREADS=2 " in out, out


def test_forced_accumulation_and_optimizer_reach_the_plan(tmp_path, tiny_config, capsys):
    """gradient_accumulation_steps and training.optim are planned, not patched in after the fit was chosen."""
    out_dir = tmp_path / "out"
    code, _, _ = run_cli(capsys, tiny_config, "--output-dir", out_dir, "--dry-run",
                         "training.gradient_accumulation_steps=3", "training.optim=adafactor")
    assert code == 0
    plan = yaml.safe_load((out_dir / "plan.yaml").read_text())
    assert (plan["micro_batch"], plan["gradient_accumulation_steps"]) == (2, 3)
    assert plan["optimizer"] == "adafactor"  # the run's own optimizer, whose memory the plan estimated


def test_a_flag_that_overrides_the_config_says_so_in_one_sentence(tmp_path, tiny_config, capsys):
    out_dir = tmp_path / "out"
    code, _, err = run_cli(capsys, tiny_config, "--output-dir", out_dir, "--dry-run", "parallel.strategy=zero2",
                           "--strategy", "ddp", "--max-steps", "3")  # the config's max_steps is 3 already
    assert code == 0
    assert err.splitlines() == [f"llaunch: --strategy ddp overrides parallel.strategy: zero2 set by {tiny_config} "
                                f"or its overrides."]
    assert yaml.safe_load((out_dir / "plan.yaml").read_text())["strategy"] == "ddp"


@pytest.mark.parametrize("override, message", [
    ("data.train_files=missing.txt", "does not exist"),
    ("training.max_steps=many", "training.max_steps must be an integer"),
    ("trainig.seed=1", "did you mean 'training'"),
    ("data.block_size=100000", "fewer than one global batch"),
])
def test_bad_configs_fail_before_anything_starts(tmp_path, tiny_config, capsys, override, message):
    code, out, err = run_cli(capsys, tiny_config, "--output-dir", tmp_path / "out", override)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_empty_dataset_is_a_user_error(tmp_path, tiny_config, capsys):
    (tmp_path / "corpus.txt").write_text("\n\n")
    code, _, err = run_cli(capsys, tiny_config, "--output-dir", tmp_path / "out")
    assert code == 2 and "hold no text" in err


def test_missing_deepspeed_is_named(tmp_path, tiny_config, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    code, _, err = run_cli(capsys, tiny_config, "--output-dir", tmp_path / "out", "--strategy", "zero3")
    assert code == 2 and "needs DeepSpeed" in err


def test_finished_run_is_not_overwritten_by_accident(tmp_path, tiny_config, capsys):
    out = tmp_path / "out"
    assert run_cli(capsys, tiny_config, "--output-dir", out, "--dry-run")[0] == 0
    (out / "final").mkdir()
    code, _, err = run_cli(capsys, tiny_config, "--output-dir", out, "--dry-run")
    assert code == 2 and "--overwrite" in err


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("dry_run", [True, False])
def test_overwrite_never_removes_a_directory_that_is_not_a_run(tmp_path, tiny_config, capsys, dry_run):
    """`--output-dir . --overwrite` (or ~) once wiped the directory; now anything but a llaunch run is refused."""
    home = tmp_path / "home"
    (home / "thesis").mkdir(parents=True)
    (home / "thesis" / "chapter1.tex").write_text("precious")
    (home / "config.yaml").write_text("mine: true\n")
    before = snapshot(home)
    code, _, err = run_cli(capsys, tiny_config, "--output-dir", home, "--overwrite", *(["--dry-run"] * dry_run))
    assert code == 2 and "not a llaunch run directory" in err and len(err.strip().splitlines()) == 1
    assert snapshot(home) == before


def test_dry_run_leaves_an_existing_run_as_it_is(tmp_path, tiny_config, capsys):
    out = tmp_path / "out"
    assert run_cli(capsys, tiny_config, "--output-dir", out, "--dry-run")[0] == 0
    (out / "checkpoints" / "step-2").mkdir(parents=True)
    (out / "checkpoints" / "step-2" / "manifest.json").write_text("{}")
    (out / "final").mkdir()
    before = snapshot(out)
    code, stdout, _ = run_cli(capsys, tiny_config, "--output-dir", out, "--dry-run", "--overwrite",
                              "training.learning_rate=1e-2")
    assert code == 0 and "left as it is" in stdout
    assert snapshot(out) == before


def test_overwrite_removes_an_earlier_run_and_says_what(tmp_path, tiny_config, capsys):
    from launcher.jobdir.prepare import prepare_job

    out = tmp_path / "out"
    prepare_job(tiny_config, output_dir=out)
    (out / "checkpoints").mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    prepare_job(tiny_config, ["training.overwrite_output_dir=true", "training.seed=7"], output_dir=out)
    err = capsys.readouterr().err
    assert "removes the earlier run" in err and "checkpoints/" in err and "metrics.jsonl" in err
    assert sorted(p.name for p in out.iterdir()) == [".llaunch.lock", "config.yaml", "plan.yaml"]
    assert yaml.safe_load((out / "config.yaml").read_text())["training"]["seed"] == 7


@pytest.mark.parametrize("torchrun_handles_sigint", [True, False])
def test_ctrl_c_stops_the_whole_process_group(tmp_path, torchrun_handles_sigint):
    """The node runtime forwards SIGINT to torchrun and then reaps the group: a child that ignores it cannot survive, nor can a
    torchrun that ignores it (hung, or started with SIGINT ignored) outlive the grace period."""
    pids = tmp_path / "pids"
    fake_torchrun = tmp_path / "fake_torchrun.py"
    disposition = "signal.default_int_handler" if torchrun_handles_sigint else "signal.SIG_IGN"
    fake_torchrun.write_text(textwrap.dedent(f"""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGINT, {disposition})
        child = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(120)"])
        open({str(pids)!r}, "w").write(str(child.pid))
        time.sleep(120)
    """))
    launcher = subprocess.Popen(
        [sys.executable, "-c", "import os, sys; from launcher.runtime.node import *; "
         f"run = NodeRun({str(tmp_path)!r}, [sys.executable, {str(fake_torchrun)!r}], dict(os.environ), 'x', "
         "WatchdogConfig(enabled=False), 'x', grace_s=5); "
         "sys.exit(supervise(run, SignalLog().install()).launcher_code())"],
        cwd=Path(__file__).resolve().parents[2],
    )
    deadline = time.monotonic() + 60
    while not pids.exists() or not pids.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    child = int(pids.read_text())
    launcher.send_signal(signal.SIGINT)
    assert launcher.wait(timeout=30) == 128 + signal.SIGINT
    time.sleep(0.5)
    assert not alive(child), "a child of the launched command outlived Ctrl-C"


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting for a (container) init to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_second_run_in_the_same_directory_is_refused_naming_the_first(tmp_path, tiny_config, capsys):
    out = tmp_path / "out"
    assert run_cli(capsys, tiny_config, "--output-dir", out, "--dry-run")[0] == 0
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from launcher.jobdir.run_lock import RunLock; lock = RunLock.acquire(sys.argv[1]); "
         "print('locked', flush=True); time.sleep(60)", str(out)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(out)
        # a flag replacing a config value is said only when the run starts, so the refusal stays one sentence
        code, _, err = run_cli(capsys, tiny_config, "--output-dir", out, "training.seed=9", "parallel.strategy=zero2",
                               "--strategy", "ddp")
        assert code == 2 and f"is in use by llaunch pid {holder.pid} on " in err and len(err.strip().splitlines()) == 1
        assert snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()


def test_only_a_caller_that_trains_keeps_the_lock(tmp_path, tiny_config):
    """`llaunch submit` writes DIR under the lock but lets it go: the SLURM job's rank 0 takes it (even while
    `submit --wait` still runs)."""
    from launcher.jobdir.prepare import prepare_job, write_job

    job = prepare_job(tiny_config, output_dir=tmp_path / "out", write=False)
    assert write_job(job) is None
    RunLock.acquire(tmp_path / "out").release()  # free
    lock = write_job(job, keep_lock=True)
    with pytest.raises(LaunchError, match="is in use by"):
        RunLock.acquire(tmp_path / "out")
    with pytest.raises(LaunchError, match="is in use by"):
        write_job(job)
    lock.release()


def test_a_lock_left_by_a_dead_run_does_not_block(tmp_path):
    from launcher.jobdir.layout import JobDir

    JobDir(tmp_path).lock.write_text("llaunch pid 999999 on gone-host since 2020-01-01 00:00 UTC")
    lock = RunLock.acquire(tmp_path)
    assert f"pid {os.getpid()}" in JobDir(tmp_path).lock.read_text()
    lock.release()
