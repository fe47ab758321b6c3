"""Hardware probe and GPU facts: no GPU is a normal answer; flags describe a cluster we are not on."""

from launcher.planning.hardware import Hardware, gpu_facts, probe
from launcher.planning.planner import PlanRequest, hardware_for


def test_probe_without_nvml_is_a_cpu_machine(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "h100:4")
    hw = probe()
    assert hw.cpu_cores >= 1 and hw.ram_bytes > 0
    assert hw.slurm.job_id == "42" and hw.slurm.nodes == 2 and hw.slurm.gpus_per_node == 4
    assert hw.nodes == 2
    if not hw.gpus:
        assert not hw.has_gpu and hw.nvml_error


def test_gpu_facts_match_nvml_names_and_short_names():
    assert gpu_facts("NVIDIA H100 80GB HBM3").key == "H100-SXM"
    assert gpu_facts("NVIDIA H100 PCIe").key == "H100-PCIe"
    assert gpu_facts("NVIDIA A100-SXM4-40GB").key == "A100-40GB"
    assert gpu_facts("a100").key == "A100-80GB"
    assert gpu_facts("NVIDIA A10G").key == "A10G"
    h100 = gpu_facts("H100")
    assert h100.peak_flops["bf16"] == 989.4e12 and h100.memory_bytes == 81559 * 2**20 and "datasheet" in h100.source
    assert gpu_facts("Voodoo 2") is None


def test_flags_describe_a_remote_node():
    hw = hardware_for(PlanRequest(model="7b", gpu="A100-40GB", gpus_per_node=4, nodes=2), Hardware(cpu_cores=2, ram_bytes=8 * 2**30))
    assert (hw.nodes, hw.gpus_per_node, hw.gpu_mem_bytes, hw.facts.key) == (2, 4, 40960 * 2**20, "A100-40GB")
    assert hw.nvlink and hw.ram_bytes > 8 * 2**30  # a remote GPU node's RAM is not this laptop's
    mem_only = hardware_for(PlanRequest(model="7b", gpu_mem_bytes=24 * 2**30), Hardware())
    assert mem_only.gpu_mem_bytes == 24 * 2**30 and mem_only.gpus_per_node == 1
