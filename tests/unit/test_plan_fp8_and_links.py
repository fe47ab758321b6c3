"""`llaunch plan --precision fp8` (torchao float8 training: the linears at the GPU's fp8 peak, the memory of
amp-bf16) and a cluster profile's own interconnect figures (NVLink GB/s, NICs x Gb/s per node) in the step time."""

import json

import pytest
import yaml

from launcher.cli import main
from launcher.errors import LaunchError
from launcher.planning import step_time
from launcher.planning.hardware import Hardware
from launcher.planning.models import load_model_spec
from launcher.planning.plan import TrainSetup, check_runnable

REPO_PROFILE = "cluster/profiles/example-h100.yaml"
TITAN_8B = ["--model", "8b", "--gpus", "8", "--gpu", "H100", "--seq-len", "8192", "--global-batch", "16",
            "--micro-batch", "2", "--strategy", "fsdp", "--activation-checkpointing", "selective", "--json"]


@pytest.fixture(autouse=True)
def no_gpus_here(monkeypatch, tmp_path):
    monkeypatch.setattr("launcher.planning.hardware.probe", lambda: Hardware(cpu_cores=2, ram_bytes=64 * 2**30))
    monkeypatch.setenv("PATH", str(tmp_path))  # no sinfo: the GPUs are the flags' or the profile's


def plan(capsys, *argv) -> dict:
    assert main(["plan", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_fp8_keeps_amp_bf16_memory_and_speeds_up_as_torchtitan_measured(capsys):
    """torchtitan's Llama 3.1 8B on 8 H100 (benchmarks/llama3_h100_202412_torchtitan.md, Table 1): Float8 ran 1.28 x
    the tokens/s of bf16; its Float8Linear saves the high-precision inputs, so memory stays amp-bf16's."""
    bf16, fp8 = (plan(capsys, *TITAN_8B, "--precision", precision) for precision in ("amp-bf16", "fp8"))
    assert fp8["precision"] == "fp8" and fp8["memory"]["peak_bytes"] == bf16["memory"]["peak_bytes"]
    speedup = fp8["predicted"]["tokens_per_s"] / bf16["predicted"]["tokens_per_s"]
    assert speedup == pytest.approx(8532 / 6667, rel=0.02)


def test_fp8_runs_only_the_linears_faster():
    """Attention stays in bf16: the longer the sequence, the smaller fp8's gain."""
    spec, hw = load_model_spec("8b"), Hardware(gpu_name_override="H100-SXM", gpus_per_node_override=8)
    gains = []
    for seq in (2048, 32768):
        times = [step_time.step_time_terms(spec, TrainSetup(strategy="fsdp", gpus_per_node=8, precision=precision,
                                                            seq_len=seq), hw, hw.facts)["compute_s"]
                 for precision in ("amp-bf16", "fp8")]
        gains.append(times[0] / times[1])
    assert 1 < gains[1] < gains[0] < 2 * step_time.FP8_EFFICIENCY_RATIO + 0.01


def test_a_plan_in_fp8_runs_under_ddp_and_fsdp_and_is_refused_elsewhere_in_one_sentence():
    """The ranks convert a full model's linears (launcher/train/float8.py) under DDP / FSDP2 only."""
    for strategy in ("ddp", "fsdp", "hsdp"):
        check_runnable(TrainSetup(strategy=strategy, nodes=2, gpus_per_node=8, precision="fp8"))
    refused = [TrainSetup(strategy="zero3", gpus_per_node=8, precision="fp8"),
               TrainSetup(strategy="fsdp", gpus_per_node=8, precision="fp8", tp=2),
               TrainSetup(strategy="fsdp", gpus_per_node=8, precision="fp8", pp=2),
               TrainSetup(strategy="fsdp", gpus_per_node=8, precision="fp8", method="lora")]
    for setup in refused:
        with pytest.raises(LaunchError, match=r"fp8 \(torchao float8\) trains full weights under --strategy ddp / "
                                              r"fsdp / hsdp without tp, pp or ep"):
            check_runnable(setup)


def test_a_plan_in_fp8_is_what_the_ranks_run(capsys):
    """torch._scaled_mm has a CPU kernel: a CPU plan keeps fp8 instead of refusing it; on GPUs the planner's fp8
    picks are strategies whose engine converts to float8 (the 70B on 64 H100 in amp-bf16 is a ZeRO-3 plan)."""
    assert plan(capsys, "--model", "tinyllama-1.1b", "--device", "cpu", "--precision", "fp8", "--json")[
        "precision"] == "fp8"
    for model, nodes in (("8b", "1"), ("70b", "8")):  # amp-bf16 plans the 70B on 64 H100 with ZeRO-3
        chosen = plan(capsys, "--model", model, "--gpu", "H100", "--gpus", "8", "--nodes", nodes, "--precision", "fp8",
                      "--json")
        assert chosen["precision"] == "fp8" and chosen["strategy"] in ("ddp", "fsdp", "hsdp"), chosen["strategy"]
        check_runnable(TrainSetup(**{k: chosen[k] for k in ("strategy", "precision", "gpus_per_node", "nodes")}))


def profile_with(tmp_path, name, **links) -> str:
    profile = yaml.safe_load(open(REPO_PROFILE).read()) | {"nodes": 16, **links}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(profile))
    return str(path)


def test_a_cluster_profiles_network_reaches_the_plan(capsys, tmp_path):
    """The example profile's 8 x 400 Gb/s per node is gpus.json's typical figure; one 100 Gb/s NIC per node is a
    32nd of it: cross-node collectives take longer and the planner picks another layout."""
    argv = ["--model", "70b", "--seq-len", "8192", "--global-batch", "1048576tok", "--json", "--cluster"]
    typical = plan(capsys, *argv, profile_with(tmp_path, "typical"))
    slow = plan(capsys, *argv, profile_with(tmp_path, "slow", nics_per_node=1, nic_gbit_per_s=100))
    assert slow["predicted"]["step_time_s"] > typical["predicted"]["step_time_s"]
    assert slow["parallel"] != typical["parallel"]  # the layout follows the network


def test_a_slower_nvlink_slows_tensor_parallel():
    spec = load_model_spec("70b")
    setup = TrainSetup(strategy="zero1", gpus_per_node=8, tp=8, precision="amp-bf16", seq_len=8192)
    seconds = []
    for nvlink in (0, 100e9):
        hw = Hardware(gpu_name_override="H100-SXM", gpus_per_node_override=8, nvlink_bytes_per_s_override=nvlink)
        seconds.append(step_time.layout.tensor_parallel_seconds(spec, setup, hw, hw.facts))
    assert seconds[1] == pytest.approx(seconds[0] * 450 / 100)


def test_the_profile_describes_the_links_per_gpu():
    from cluster.profile import load_profile

    hw = load_profile(REPO_PROFILE).hardware()
    assert hw.network_bytes_per_s == 8 * 400e9 / 8 / 8 and hw.node_link_bytes_per_s(hw.facts) == 450e9
