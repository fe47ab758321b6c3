"""`llaunch run`: bad configs stop before any process starts; --dry-run shows the command; Ctrl-C leaves no orphans."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from launcher.cli import main


@pytest.fixture
def tiny_config(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("def add(a, b):\n    return a + b\n\n" * 400)
    config = {
        "model": {"name_or_path": "tinyllama-1.1b", "overrides": {
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2}},
        "data": {"train_files": ["corpus.txt"], "vocab_size": 280, "block_size": 32,
                 "cache_dir": str(tmp_path / "cache")},
        "training": {"max_steps": 3, "per_device_train_batch_size": 2},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(capsys, *argv):
    code = main(["run", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_dry_run_plans_writes_the_job_and_prints_torchrun(tmp_path, tiny_config, capsys):
    out_dir = tmp_path / "out"
    code, out, _ = run_cli(capsys, tiny_config, "--output-dir", out_dir, "--dry-run", "--strategy", "zero2",
                           "--nproc-per-node", "2", "training.learning_rate=1e-3")
    assert code == 0
    assert "DS_ACCELERATOR=cpu" in out and "launcher.torchrun --standalone" in out
    assert f"--nproc-per-node 2 --max-restarts 0 -m launcher.train --job-dir {out_dir}" in out
    plan = yaml.safe_load((out_dir / "plan.yaml").read_text())
    assert (plan["strategy"], plan["device"], plan["gpus_per_node"], plan["seq_len"]) == ("zero2", "cpu", 2, 32)
    config = yaml.safe_load((out_dir / "config.yaml").read_text())
    assert config["training"]["learning_rate"] == 1e-3 and config["parallel"]["strategy"] == "zero2"
    assert config["data"]["train_files"] == [str(tmp_path / "corpus.txt")]


def test_forced_accumulation_and_optimizer_reach_the_plan(tmp_path, tiny_config, capsys):
    """gradient_accumulation_steps and training.optim are planned, not patched in after the fit was chosen."""
    out_dir = tmp_path / "out"
    code, _, _ = run_cli(capsys, tiny_config, "--output-dir", out_dir, "--dry-run",
                         "training.gradient_accumulation_steps=3", "training.optim=sgd")
    assert code == 0
    plan = yaml.safe_load((out_dir / "plan.yaml").read_text())
    assert (plan["micro_batch"], plan["gradient_accumulation_steps"]) == (2, 3)
    assert plan["optimizer"] == "sgd"


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
    (tmp_path / "out" / "final").mkdir(parents=True)
    code, _, err = run_cli(capsys, tiny_config, "--output-dir", tmp_path / "out", "--dry-run")
    assert code == 2 and "--overwrite" in err
    code, _, _ = run_cli(capsys, tiny_config, "--output-dir", tmp_path / "out", "--dry-run", "--overwrite")
    assert code == 0 and not (tmp_path / "out" / "final").exists()


def test_ctrl_c_stops_the_whole_process_group(tmp_path):
    """The launcher forwards SIGINT and then reaps the group: a child that ignores it cannot survive."""
    pids = tmp_path / "pids"
    fake_torchrun = tmp_path / "fake_torchrun.py"
    fake_torchrun.write_text(textwrap.dedent(f"""
        import signal, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(120)"])
        open({str(pids)!r}, "w").write(str(child.pid))
        time.sleep(120)
    """))
    launcher = subprocess.Popen(
        [sys.executable, "-c", "import sys; from launcher.torchrun import run_torchrun; "
         f"sys.exit(run_torchrun([sys.executable, {str(fake_torchrun)!r}], {{}}, grace_s=5))"],
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
