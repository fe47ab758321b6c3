"""Every shipped example trains for a few steps (2 gloo ranks on CPU): the quickstart under every strategy, the
other examples under those of TRAINED, and every example is refused before any process starts under each
strategy it does not allow.

Each example keeps its own knobs (method, LoRA, optimizer, scheduler, precision, checkpointing, offload, tied
embeddings); only what cannot run here shrinks: the model's width and depth, the data (a small text file or
small arithmetic JSONL), the batch and the step count. The job directories are prepared by the product's own
launcher side (`prepare_job`, which also refuses what a strategy cannot do), then trained in one torchrun.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launcher.errors import LaunchError
from launcher.jobdir.prepare import prepare_job
from launcher.planning.plan import STRATEGIES
from tests.tiny_run import TINY_LLAMA

# The first test pays for training the whole matrix (2-3 minutes idle, 8 under heavy load).
pytestmark = [pytest.mark.dist, pytest.mark.timeout(1500)]
REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("examples_worker.py")
TINY = {**TINY_LLAMA, "max_position_embeddings": 128}
# What each example allows: its own parallel.strategy, else every strategy its method can run under (the
# others must be refused before any process starts).
ALLOWED = {
    "quickstart": STRATEGIES,
    "arith_base": STRATEGIES,
    "sft_lora": STRATEGIES,
    "full_ft_fsdp": ("fsdp",),
    "fsdp-multi-gpu": ("fsdp",),
    "zero3-multi-gpu": ("zero3",),
    "single-gpu-bf16": ("ddp",),
    "qlora_1gpu": ("ddp",),
    "qlora_fsdp": ("fsdp",),
    "moe": STRATEGIES,
    "tp_pp": ("fsdp",),
}
# What trains in the matrix where an example allows more than one strategy: the quickstart (the README's job)
# under each, the others under a data-parallel and a sharding engine apiece, so that each engine runs each
# method (full, LoRA, MoE) somewhere; test_engines.py holds the engines' numerics against each other.
TRAINED = {"quickstart": STRATEGIES, "arith_base": ("zero1", "zero3"), "sft_lora": ("ddp", "fsdp"),
           "moe": ("hsdp", "zero2")}
# Examples that run once as their comment lays them out (through `llaunch run`, 4 ranks), not in the 2-rank matrix.
LAID_OUT = {"tp_pp": ("--nproc-per-node", "4", "--tp", "2", "--pp", "2", "--pp-microbatches", "2")}


def test_every_example_is_in_the_matrix():
    assert sorted(ALLOWED) == sorted(p.stem for p in (REPO / "examples").glob("*.yaml"))
    assert all(set(trained) <= set(ALLOWED[example]) for example, trained in TRAINED.items())
    for method_examples in (("arith_base",), ("sft_lora",), ("moe",)):  # each method under both kinds of engine
        trained = {s for example in method_examples for s in TRAINED[example]}
        assert trained & {"ddp", "zero1", "zero2"} and trained & {"fsdp", "hsdp", "zero3"}, method_examples


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, word_text):
    root = tmp_path_factory.mktemp("example-data")
    subprocess.run([sys.executable, str(REPO / "examples/make_arithmetic.py"), "data", "--out", str(root / "arith"),
                    "--count", "300", "--eval-count", "40", "--max-operand", "20", "--hidden-size", "32",
                    "--layers", "2"], check=True, capture_output=True)
    return {"text": word_text, "arith": root / "arith"}


def shrunk_overrides(example: Path, data: dict) -> list[str]:
    """The example as shipped, made small enough for two CPU processes and a few steps."""
    config = yaml.safe_load(example.read_text())
    model, sft = config["model"], config.get("data", {}).get("dataset_format", "text") != "text"
    overrides = ["parallel.nproc_per_node=2", "training.max_steps=2", "training.per_device_train_batch_size=2",
                 "training.gradient_accumulation_steps=1", "training.global_batch_size=null", "training.save_steps=1",
                 "training.eval_steps=1", "training.logging_steps=1", "training.report_to=[]"]
    if Path(model["name_or_path"]).is_absolute() or "/" in model["name_or_path"]:  # a local model directory
        overrides.append(f"model.name_or_path={data['arith'] / 'init'}")
    else:  # a catalog architecture, random-init: its own overrides (e.g. tied embeddings), made tiny
        overrides.append("model.overrides=" + json.dumps({**model.get("overrides", {}), **TINY}))
    if sft:
        overrides += [f"data.train_files=[{data['arith'] / 'train.jsonl'}]",
                      f"data.eval_files=[{data['arith'] / 'eval.jsonl'}]", "data.block_size=64",
                      "data.validation_split_percentage=0"]
    else:
        overrides += [f"data.train_files=[{data['text']}]", "data.vocab_size=300", "data.block_size=32",
                      "data.max_train_bytes=null", "data.validation_split_percentage=10", "data.max_eval_samples=8"]
    return overrides


def cannot_run_here(name: str) -> str | None:
    if name.startswith("qlora") and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed"
    if importlib.util.find_spec("deepspeed") is None and any(s.startswith("zero") for s in ALLOWED[name]):
        return "DeepSpeed is not installed"
    return None


@pytest.fixture(scope="module")
def matrix(small_data, tmp_path_factory):
    """Prepare every (example, strategy) job, check the refusals, train them all in one torchrun."""
    root = tmp_path_factory.mktemp("examples")
    jobs, skipped = {}, {}
    for example in sorted((REPO / "examples").glob("*.yaml")):
        reason = cannot_run_here(example.stem)
        if example.stem in LAID_OUT:
            continue
        if reason:
            skipped[example.stem] = reason
            continue
        fixed = (yaml.safe_load(example.read_text()).get("parallel") or {}).get("strategy")
        for strategy in [fixed] if fixed else STRATEGIES:
            overrides = [*shrunk_overrides(example, small_data), f"parallel.strategy={strategy}"]
            name = f"{example.stem}-{strategy}"
            try:
                job = prepare_job(example, overrides, output_dir=root / name)
            except LaunchError as err:
                assert strategy not in ALLOWED[example.stem], f"{name} refused: {err}"
                continue
            assert strategy in ALLOWED[example.stem], f"{name} was accepted; the example does not allow it"
            if strategy in TRAINED.get(example.stem, ALLOWED[example.stem]):
                jobs[name] = job.output_dir
    env = {"PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             str(WORKER), "--out", str(root / "codes.json"), *map(str, jobs.values())],
                            env={**os.environ, **env}, capture_output=True, text=True, timeout=1400)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return jobs, json.loads((root / "codes.json").read_text()), skipped


@pytest.mark.parametrize("example", sorted(set(ALLOWED) - set(LAID_OUT)))
def test_example_trains_under_the_strategies_it_allows(matrix, example):
    jobs, codes, skipped = matrix
    if example in skipped:
        pytest.skip(f"{example}: {skipped[example]}")
    for strategy in TRAINED.get(example, ALLOWED[example]):
        name = f"{example}-{strategy}"
        assert codes[name] == 0, name
        rows = [json.loads(line) for line in (jobs[name] / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in rows if "loss" in r]
        assert len(losses) == 2 and all(math.isfinite(x) for x in losses), (name, losses)
        assert (jobs[name] / "checkpoints" / "step-2" / "manifest.json").exists(), name
        assert list((jobs[name] / "final").glob("*.safetensors")), name


@pytest.mark.parametrize("example", sorted(LAID_OUT))
def test_example_trains_as_its_comment_lays_it_out(small_data, tmp_path, example):
    """`llaunch run examples/tp_pp.yaml --nproc-per-node 4 --tp 2 --pp 2`, shrunk to two steps: tp 2 x pp 2."""
    path, output = REPO / "examples" / f"{example}.yaml", tmp_path / example
    shrunk = [o for o in shrunk_overrides(path, small_data)
              if not o.startswith(("parallel.nproc_per_node=", "training.gradient_accumulation_steps="))]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", "launcher", "run", str(path), "--output-dir", str(output),
                           *LAID_OUT[example], *shrunk], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    layout = yaml.safe_load((output / "plan.yaml").read_text())["parallel"]
    assert (layout["tp"], layout["pp"], layout["dp_shard"]) == (2, 2, 1), layout
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), losses
    assert (output / "checkpoints" / "step-2" / "manifest.json").exists()
    assert list((output / "final").glob("*.safetensors"))
