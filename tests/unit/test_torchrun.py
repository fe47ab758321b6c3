"""The torchrun command and the DeepSpeed JSON are pure functions of the plan: golden-tested."""

from __future__ import annotations

import pytest

from ds_configs import render_ds_config
from launcher.config import TrainingSection
from launcher.errors import LaunchError
from launcher.planning.plan import Plan
from launcher.runtime.torchrun import build_torchrun_argv

TAIL = ["-m", "launcher.train", "--job-dir", "/runs/a"]


def test_single_gpu_node_is_standalone():
    plan = Plan(model="tinyllama-1.1b", strategy="fsdp", gpus_per_node=8, device="cuda")
    argv, env = build_torchrun_argv(plan, "/runs/a", cpus_per_node=64)
    assert argv == ["python", "-m", "launcher.runtime.torchrun", "--signals-to-handle",
                    "SIGINT,SIGHUP,SIGQUIT", "--standalone", "--nnodes", "1", "--nproc-per-node",
                    "8", "--max-restarts", "0", *TAIL]
    assert env == {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "8",
                   "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


def test_cpu_runs_set_the_deepspeed_cpu_accelerator():
    plan = Plan(model="m", strategy="zero3", gpus_per_node=2, device="cpu", precision="fp32")
    _, env = build_torchrun_argv(plan, "/runs/a", cpus_per_node=2)
    assert env["DS_ACCELERATOR"] == "cpu" and env["OMP_NUM_THREADS"] == "1"
    _, ddp_env = build_torchrun_argv(Plan(model="m", device="cpu", precision="fp32"), "/runs/a")
    assert ddp_env["DS_ACCELERATOR"] == "cpu" and "OMP_NUM_THREADS" not in ddp_env


def test_multi_node_uses_c10d_rendezvous():
    plan = Plan(model="m", strategy="zero3", nodes=4, gpus_per_node=8)
    argv, env = build_torchrun_argv(plan, "/runs/a", nnodes=4, rdzv_endpoint="node001:29500", rdzv_id="1234",
                                    max_restarts=3, python="/venv/bin/python")
    assert argv == ["/venv/bin/python", "-m", "launcher.runtime.torchrun", "--signals-to-handle",
                    "SIGINT,SIGHUP,SIGQUIT", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                    "node001:29500", "--rdzv-id", "1234", "--nnodes", "4", "--nproc-per-node", "8",
                    "--max-restarts", "3", *TAIL]
    assert "DS_ACCELERATOR" not in env


def test_multi_node_without_endpoint_is_a_user_error():
    with pytest.raises(LaunchError, match="rendezvous endpoint"):
        build_torchrun_argv(Plan(model="m", nodes=2), "/runs/a", nnodes=2)


def test_zero3_offload_config_is_rendered_from_the_plan_and_user_keys_win():
    plan = Plan(model="m", strategy="zero3", offload="optimizer+params", precision="amp-bf16", micro_batch=4,
                gradient_accumulation_steps=8, gpus_per_node=8, nodes=2)
    training = TrainingSection(learning_rate=2e-4, max_grad_norm=0.5, weight_decay=0.1)
    config = render_ds_config(plan, training, hidden_size=1024,
                              overrides={"zero_optimization": {"overlap_comm": False}, "steps_per_print": 10})
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"]) == (4, 8, 4 * 8 * 16)
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"] == {"enabled": True} and config["fp16"]["enabled"] is False
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu"
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert zero["reduce_bucket_size"] == 1024 * 1024 and zero["stage3_param_persistence_threshold"] == 10240
    assert config["optimizer"]["params"]["lr"] == 2e-4  # DeepSpeed's CPU Adam for the offloaded optimizer
    assert zero["overlap_comm"] is False and config["steps_per_print"] == 10
    assert "auto" not in str(config)


def test_zero1_without_offload_uses_the_client_optimizer():
    plan = Plan(model="m", strategy="zero1", precision="fp32", micro_batch=2, gpus_per_node=2, device="cpu")
    config = render_ds_config(plan, TrainingSection(), hidden_size=64)
    assert "optimizer" not in config and config["zero_optimization"]["stage"] == 1
    assert config["bf16"]["enabled"] is False and "auto" not in str(config)
