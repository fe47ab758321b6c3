"""`llaunch plan` without a GPU plans for GPUs: flags, a cluster profile, the login node's partition, or what it takes."""

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.cli import main
from launcher.planning.hardware import Hardware, login_node_partition, parse_sinfo, pick_partition

NO_GPU = Hardware(cpu_cores=2, ram_bytes=24 * 2**30, ram_available_bytes=20 * 2**30, hostname="laptop")
# `sinfo --noheader --format "%P|%G|%f|%D|%m|%c"` as sites print it (types, sockets, mixed nodes, CPU partitions).
SINFO = """\
cpu|(null)|(null)|40|192000|64
gpu*|gpu:h100:8(S:0-1)|h100,ib|12|2000000|96
gpu*|gpu:8|(null)|2|1000000+|96
a100|gpu:nvidia_a100-sxm4-40gb:4(S:0-1),shard:16|a100,40gb|3|500000|64
small|gpu:4|gpu,rtx|5|256000|32
"""


@pytest.fixture
def no_gpu(monkeypatch, tmp_path):
    """This machine as a laptop: no GPU, no SLURM (a PATH without sinfo); fake_sinfo() adds one."""
    monkeypatch.setattr("launcher.planning.hardware.probe", lambda: NO_GPU)
    monkeypatch.setenv("PATH", str(tmp_path))
    return tmp_path


def fake_sinfo(folder: Path, output: str, status: int = 0) -> None:
    script = folder / "sinfo"
    script.write_text(f"#!/bin/sh\necho \"$@\" > {folder}/sinfo-args\n/bin/cat <<'EOF'\n{output}EOF\nexit {status}\n")
    script.chmod(0o755)


def plan_json(argv, capsys) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_sinfo_lines_become_gpu_partitions():
    entries = {(e.partition, e.nodes): e for e in parse_sinfo(SINFO)}
    assert set(entries) == {("gpu", 12), ("gpu", 2), ("a100", 3), ("small", 5)}  # no GPUs: no entry
    h100 = entries[("gpu", 12)]
    assert (h100.default, h100.gpu_name, h100.gpus_per_node, h100.ram_bytes, h100.cpus) == (True, "H100-SXM", 8, 2000000 * 2**20, 96)
    assert entries[("gpu", 2)].ram_bytes == 1000000 * 2**20  # "1000000+": mixed nodes, the smallest
    assert entries[("a100", 3)].gpu_name == "A100-40GB"  # the Gres type names it, the features pick the 40 GB one
    assert entries[("a100", 3)].gpus_per_node == 4  # shards are not GPUs
    assert entries[("small", 5)].gpu_name == ""  # neither Gres nor features name a GPU model
    assert pick_partition(parse_sinfo(SINFO), None).gpu_name == "H100-SXM"  # the default partition's larger node type
    assert pick_partition(parse_sinfo(SINFO), "a100").gpus_per_node == 4
    assert pick_partition(parse_sinfo(SINFO), "cpu") is None


def test_sinfo_is_run_with_the_partition_and_a_failure_is_no_slurm(no_gpu):
    fake_sinfo(no_gpu, SINFO)
    assert login_node_partition().partition == "gpu"
    assert login_node_partition("a100").partition == "a100"
    assert (no_gpu / "sinfo-args").read_text().split()[-2:] == ["--partition", "a100"]
    fake_sinfo(no_gpu, "sinfo: error: Could not establish a configuration source\n", status=1)
    assert login_node_partition() is None


def test_plan_70b_with_nothing_described_is_what_it_takes(no_gpu, capsys):
    data = plan_json(["--model", "70b"], capsys)
    rows = {(r["gpu"], r["method"]): r for r in data["what_it_takes"]}
    assert len(rows) == 18 and data["model"] == "llama-3.1-70b"
    full = rows[("H100-SXM", "full")]  # 16 B/param of model states need 32 x 80 GB without offload
    assert (full["gpus"], full["plan"]["nodes"], full["plan"]["offload"]) == (32, 4, "none")
    assert rows[("H100-SXM", "qlora")]["gpus"] == 1 and rows[("H100-SXM", "qlora")]["plan"]["strategy"] == "ddp"
    assert rows[("H200", "lora")]["gpus"] < rows[("H100-SXM", "lora")]["gpus"]
    # FSDP shards the 4-bit base (~36 GB): Answer.AI's 70B QLoRA on 24 GB cards, the PEFT docs' on 2 x 40 GB.
    assert rows[("RTX-4090", "qlora")]["plan"]["strategy"] == "fsdp" and rows[("RTX-4090", "qlora")]["gpus"] == 4
    assert rows[("A100-40GB", "qlora")]["gpus"] == 2
    for row in rows.values():
        if row["plan"]:
            memory = row["plan"]["memory"]
            assert memory["reserved_bytes"] <= memory["limit_bytes"]


def test_what_it_takes_table_and_a_method_narrows_it(no_gpu, capsys):
    assert main(["plan", "--model", "405b"]) == 0
    table = capsys.readouterr().out
    assert "the fewest GPUs that fit" in table and "RTX-4090" in table and "does not fit" in table
    data = plan_json(["--model", "8b", "--method", "lora"], capsys)
    assert {r["method"] for r in data["what_it_takes"]} == {"lora"} and len(data["what_it_takes"]) == 6


def test_flags_plan_for_gpus_not_for_this_cpu(no_gpu, capsys):
    plan = plan_json(["--model", "70b", "--gpus", "8", "--nodes", "2"], capsys)
    assert (plan["device"], plan["gpu_name"], plan["nodes"], plan["gpus_per_node"]) == ("cuda", "H100-SXM", 2, 8)
    plan = plan_json(["--model", "70b", "--nodes", "4"], capsys)
    assert plan["gpus_per_node"] == 8  # nodes without --gpus are nodes of eight
    plan = plan_json(["--model", "8b", "--method", "qlora", "--gpus", "1", "--gpu-mem", "24GiB"], capsys)
    assert plan["gpu_mem_bytes"] == 24 * 2**30 and plan["device"] == "cuda"


def test_cluster_profile_gives_the_nodes_and_flags_override_it(no_gpu, capsys):
    plan = plan_json(["--model", "70b", "--cluster", "example-h100"], capsys)
    assert (plan["nodes"], plan["gpus_per_node"], plan["gpu_name"]) == (2, 8, "H100-SXM")
    plan = plan_json(["--model", "70b", "--cluster", "example-h100", "--nodes", "4", "--gpu", "A100-40GB"], capsys)
    assert (plan["nodes"], plan["gpus_per_node"], plan["gpu_name"]) == (4, 8, "A100-40GB")


def test_login_node_plans_for_its_partition(no_gpu, capsys):
    fake_sinfo(no_gpu, SINFO)
    plan = plan_json(["--model", "8b"], capsys)
    assert (plan["gpu_name"], plan["gpus_per_node"], plan["nodes"]) == ("H100-SXM", 8, 1)
    plan = plan_json(["--model", "8b", "--partition", "a100", "--nodes", "2"], capsys)
    assert (plan["gpu_name"], plan["gpus_per_node"], plan["nodes"]) == ("A100-40GB", 4, 2)
    assert main(["plan", "--model", "8b", "--partition", "cpu"]) == 2
    assert "no GPU nodes in partition 'cpu'" in capsys.readouterr().err


def test_cpu_plan_only_when_asked(no_gpu, capsys):
    plan = plan_json(["--model", "gpt2", "--device", "cpu", "--gpus", "2", "--seq-len", "128"], capsys)
    assert (plan["device"], plan["gpus_per_node"]) == ("cpu", 2)
    assert main(["plan", "--model", "gpt2", "--device", "cpu", "--gpu", "H100"]) == 2
    assert "drop --gpu" in capsys.readouterr().err


def test_what_it_takes_has_no_single_plan_to_write(no_gpu, tmp_path, capsys):
    assert main(["plan", "--model", "70b", "-o", str(tmp_path / "plan.yaml")]) == 2
    assert "-o and --trace need one plan" in capsys.readouterr().err and not (tmp_path / "plan.yaml").exists()


@pytest.mark.parametrize("argv", [
    ["--model", "70b"],
    ["--model", "70b", "--gpus", "8", "--nodes", "2"],
    ["--model", "8b", "--method", "qlora", "--gpus", "1", "--gpu-mem", "24GiB"],
    ["--model", "70b", "--cluster", "example-h100", "--nodes", "2"],
])
def test_readme_commands_exit_0_fast_with_no_gpu_visible(argv, tmp_path):
    """As a user types them, in a fresh process that sees no GPU and no SLURM: about a second of the process's own
    CPU time (what it costs on an idle machine; the wall time of a loaded CI worker says more about its neighbour)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PATH": str(tmp_path)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, "-m", "launcher", "plan", *argv], capture_output=True, text=True,
                          timeout=60, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert done.returncode == 0, done.stderr
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu_s < 2.0, f"llaunch plan {' '.join(argv)} took {cpu_s:.2f} s of CPU"
    assert "H100" in done.stdout and "CPU" not in done.stdout


def test_plot_draws_the_candidates_with_the_chosen_plan(no_gpu, tmp_path, capsys):
    from PIL import Image

    picture = tmp_path / "plan.png"
    assert main(["plan", "--model", "70b", "--cluster", "example-h100", "--plot", str(picture)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {picture}" in printed
    chosen = printed.split("chosen: ")[1].split(",")[0]  # "fsdp + offload optimizer+params"
    with Image.open(picture) as image:
        assert image.format == "PNG" and image.width > 800 and image.height > 300
        description = image.info["Description"]
    assert description.startswith("chosen: fsdp+off:optimizer+params mb=16") and chosen.startswith("fsdp")
    assert not list(tmp_path.glob("*.tmp"))


def test_plot_of_what_it_takes_and_bad_plot_paths(no_gpu, tmp_path, capsys):
    from PIL import Image

    picture = tmp_path / "sizing.png"
    assert main(["plan", "--model", "8b", "--plot", str(picture)]) == 0
    with Image.open(picture) as image:
        assert image.format == "PNG" and "H100-SXM full: 2 GPUs " in image.info["Description"]
    capsys.readouterr()
    for bad, message in ((tmp_path / "plan.svg", "must name a .png"), (tmp_path / "no" / "plan.png", "does not exist")):
        assert main(["plan", "--model", "8b", "--plot", str(bad)]) == 2
        assert message in capsys.readouterr().err and not bad.exists()


def test_plan_without_plot_loads_no_matplotlib():
    code = ("import sys; from launcher.cli import main; rc = main(['plan', '--model', '70b', '--gpus', '8', '--json']); "
            "assert rc == 0 and 'matplotlib' not in sys.modules and 'torch' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_trace_of_an_fsdp_plan_runs_at_its_world_size(no_gpu, capsys):
    """`plan --strategy fsdp --trace --json`: the estimate (memory.peak_bytes) beside one FSDP rank's traced peak."""
    plan = plan_json(["--model", "tinyllama-1.1b", "--gpus", "8", "--gpu", "H100", "--strategy", "fsdp", "--trace"],
                     capsys)
    trace = plan["trace"]
    assert (trace["strategy"], trace["world_size"]) == ("fsdp", 8)
    assert trace["estimate_bytes"] == plan["memory"]["peak_bytes"]
    assert abs(plan["memory"]["peak_bytes"] / trace["peak_bytes"] - 1) < 0.05
