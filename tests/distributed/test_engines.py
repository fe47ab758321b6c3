"""Every engine runs the same loop to the same numbers (CPU, fp32, 2 gloo ranks), and the quickstart learns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_run import TINY_LLAMA

pytestmark = pytest.mark.dist
WORKER = Path(__file__).with_name("engines_worker.py")
REPO = Path(__file__).resolve().parents[2]
ENGINE_RUNS = ["ddp:2:2", "ddp:4:1", "fsdp:2:2", "fsdp:4:1", "zero1:2:2", "zero2:2:2", "zero3:2:2", "zero2:4:1"]
TIED_RUNS = ["ddp:2:2:tied", "fsdp:2:2:tied", "zero3:2:2:tied"]  # one embedding matrix for input and output
HSDP_RUNS = ["hsdp:2:2:mesh2x1", "hsdp:2:2:mesh1x2"]  # (replicate, shard): 2 "nodes" of 1 rank, 1 node of 2
OFFLOAD_RUNS = ["fsdp:2:2:offload"]  # FSDP2 CPUOffloadPolicy: shards, gradients and AdamW on the host
FP8_RUNS = ["ddp:2:2:fp8", "fsdp:2:2:fp8"]  # torchao float8 linears (torch._scaled_mm has a CPU kernel)
# Selective recompute (op-level SAC, launcher/train/recompute.py), each beside the same run without recompute.
SAC_RUNS = {"ddp:2:2:sac": "ddp:2:2", "fsdp:2:2:sac+tp2": "fsdp:2:2:tp2"}
RUNS = [*ENGINE_RUNS, "ddp:2:2:ckpt", "fsdp:2:2:ckpt", *SAC_RUNS, "fsdp:2:2:tp2", "ddp:2:2:amp-bf16", "fsdp:2:2:amp-bf16", *TIED_RUNS, *HSDP_RUNS,
        *OFFLOAD_RUNS, *FP8_RUNS]


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory, torchrun_workers, word_text):
    out = tmp_path_factory.mktemp("engines")
    torchrun_workers(WORKER, "--out", str(out), "--data", str(word_text), *RUNS)
    return out, json.loads((out / "losses.json").read_text())


def weights(out: Path, run: str):
    from safetensors.torch import load_file

    return load_file(out / run.replace(":", "-") / "weights.safetensors")


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.parametrize("run", [r for r in ENGINE_RUNS if r != "ddp:2:2"] + ["ddp:2:2:ckpt", "fsdp:2:2:ckpt", *HSDP_RUNS,
                                                                              *OFFLOAD_RUNS])
def test_same_seed_same_losses_under_every_engine(engine_runs, run):
    _, losses = engine_runs
    reference = losses["ddp:2:2"]
    assert reference[0] > reference[-1], f"the loss did not fall: {reference}"
    for step, (got, want) in enumerate(zip(losses[run], reference)):
        assert rel_diff(got, want) <= 1e-3, f"{run} step {step + 1}: loss {got} vs DDP {want}"


def test_engines_run_the_chunked_loss_and_fsdp_offloads_as_declared(engine_runs):
    """launcher.planning.plan.ENGINE_SUPPORT: every engine but ZeRO-3 computes the loss in chunks; plan.offload reaches
    FSDP2 as its CPUOffloadPolicy (on this CPU-only machine the losses cannot tell them apart)."""
    out, _ = engine_runs
    facts = json.loads((out / "facts.json").read_text())
    assert {run: fact["chunked_loss"] for run, fact in facts.items() if run in ENGINE_RUNS} == {
        run: not run.startswith("zero3") for run in ENGINE_RUNS}
    assert facts["fsdp:2:2:offload"]["offload_policy"] == "CPUOffloadPolicy"
    assert facts["fsdp:2:2"]["offload_policy"] == "OffloadPolicy"


@pytest.mark.parametrize("run", SAC_RUNS)
def test_selective_recompute_runs_the_sac_policy_to_the_same_losses(engine_runs, run):
    """plan.activation_checkpointing selective reaches every decoder layer as torch.utils.checkpoint with the
    op-level SAC contexts, under DDP and under FSDP2 with tp 2 (whose DTensor all-gathers it recomputes), and
    the losses are those of the same run without recompute (fp32 on CPU: the recomputed ops give the same bits)."""
    out, losses = engine_runs
    facts = json.loads((out / "facts.json").read_text())
    assert (facts[run]["recompute_context"], facts[SAC_RUNS[run]]["recompute_context"]) == ("selective_contexts", None)
    for step, (got, want) in enumerate(zip(losses[run], losses[SAC_RUNS[run]])):
        assert rel_diff(got, want) <= 1e-6, f"{run} step {step + 1}: loss {got} vs {want} without recompute"


@pytest.mark.parametrize("run", ["ddp:2:2:amp-bf16", "fsdp:2:2:amp-bf16"])
def test_bf16_mixed_precision_tracks_fp32(engine_runs, run):
    """Autocast (DDP) and FSDP2's bf16 parameter policy: same losses as fp32 to bf16 accuracy, still learning."""
    _, losses = engine_runs
    for step, (got, want) in enumerate(zip(losses[run], losses["ddp:2:2"])):
        assert rel_diff(got, want) <= 2e-2, f"{run} step {step + 1}: loss {got} vs fp32 {want}"
    assert losses[run][-1] < losses[run][0]


@pytest.mark.parametrize("run", FP8_RUNS)
def test_fp8_swaps_every_decoder_linear_and_tracks_bf16(engine_runs, run):
    """--precision fp8 (launcher/train/float8.py): the 7 linears of each of the 2 layers become torchao Float8Linear,
    the LM head does not; the losses are amp-bf16's within fp8's rounding but not equal to them (the casts ran),
    and the weights keep their names."""
    out, losses = engine_runs
    linears = json.loads((out / "facts.json").read_text())[run]["float8_linears"]
    assert len(linears) == 14 and not any("lm_head" in name for name in linears), linears
    amp = losses[run.replace("fp8", "amp-bf16")]
    for step, (got, want) in enumerate(zip(losses[run], amp)):
        assert rel_diff(got, want) <= 2e-2, f"{run} step {step + 1}: loss {got} vs amp-bf16 {want}"
    assert losses[run] != amp and losses[run][-1] < losses[run][0]
    assert weights(out, run).keys() == weights(out, "ddp:2:2").keys()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2"])
def test_micro2_accum2_equals_micro4_accum1(engine_runs, strategy):
    out, _ = engine_runs
    accumulated, single = weights(out, f"{strategy}:2:2"), weights(out, f"{strategy}:4:1")
    assert accumulated.keys() == single.keys()
    worst = max((accumulated[k] - single[k]).abs().max().item() for k in single)
    assert worst < 1e-5, f"{strategy}: weights differ by {worst} after identical updates"


@pytest.mark.parametrize("run", TIED_RUNS[1:])
def test_tied_embeddings_stay_tied_and_train_alike_under_every_engine(engine_runs, run):
    """FSDP's meta-device ranks used to build the model untied: one parameter more than rank 0, so the ranks'
    collectives no longer matched and gloo aborted at the first forward."""
    out, losses = engine_runs
    reference = losses["ddp:2:2:tied"]
    assert losses[run] == pytest.approx(reference, rel=1e-3), run
    assert rel_diff(reference[0], losses["ddp:2:2"][0]) > 1e-3  # tying changed the model, so this run tested it
    tied, other = weights(out, "ddp:2:2:tied"), weights(out, run)
    assert tied.keys() == other.keys()
    assert max((other[k] - tied[k]).abs().max().item() for k in tied) < 1e-4
    if "lm_head.weight" in other:  # consolidated state names both; they must still be one matrix after training
        assert other["lm_head.weight"].equal(other["model.embed_tokens.weight"])


def test_engines_consolidate_identical_weights(engine_runs):
    out, _ = engine_runs
    reference = weights(out, "ddp:2:2")
    for run in ("fsdp:2:2", "zero1:2:2", "zero3:2:2", *HSDP_RUNS):
        other = weights(out, run)
        missing = set(reference) - set(other)
        assert not missing, f"{run} lacks {sorted(missing)[:3]}"
        worst = max((other[k] - reference[k]).abs().max().item() for k in reference)
        assert worst < 1e-4, f"{run}: final weights differ from DDP by {worst}"


def test_hsdp_shards_on_the_plans_replicate_x_shard_mesh(engine_runs):
    """The plan's nodes x gpus_per_node become FSDP2's 2-D mesh (launcher.train.device_mesh.RankMeshes.fsdp):
    parameters replicated over the first dimension, sharded over the second; plain FSDP keeps its 1-D mesh over
    the world, and so does HSDP of one replica (one node), which is FSDP."""
    out, _ = engine_runs
    meshes = json.loads((out / "meshes.json").read_text())
    assert meshes["fsdp:2:2"] == {"shape": [2], "placements": ["S(0)"]}
    assert meshes["hsdp:2:2:mesh2x1"] == {"shape": [2, 1], "placements": ["R", "S(0)"]}
    assert meshes["hsdp:2:2:mesh1x2"] == {"shape": [2], "placements": ["S(0)"]}


@pytest.mark.timeout(900)  # the run's own limit; beside the other test worker's jobs it outran pytest's 600 s
def test_quickstart_loss_falls_20_percent_in_60_steps(tmp_path):
    """The README's first command, as a user runs it (one CPU process), learns clearly."""
    out = tmp_path / "qs"
    cmd = [sys.executable, "-m", "launcher", "run", str(REPO / "examples" / "quickstart.yaml"), "--output-dir",
           str(out), "--max-steps", "60", f"data.cache_dir={tmp_path / 'cache'}", "training.eval_steps=null"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert train[0]["step"] == 1 and train[-1]["step"] == 60
    assert train[-1]["loss"] <= 0.8 * train[0]["loss"], [r["loss"] for r in train]
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in train)
    assert (out / "final" / "model.safetensors").exists()


def test_llaunch_run_two_ranks_writes_a_loadable_model_and_generate_continues_it(tmp_path):
    """`llaunch run` -> torchrun -> 2 FSDP ranks -> DIR/final that transformers loads and generate uses."""
    import yaml

    text = tmp_path / "corpus.txt"
    text.write_text("def add(a, b):\n    return a + b\n\nclass Point:\n    x: int\n\n" * 300)
    config = {
        "model": {"name_or_path": "tinyllama-1.1b", "overrides": TINY_LLAMA},
        "data": {"train_files": [str(text)], "vocab_size": 280, "block_size": 32, "cache_dir": str(tmp_path / "c"),
                 "validation_split_percentage": 10},
        "training": {"per_device_train_batch_size": 2, "logging_steps": 2, "eval_steps": 2},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "launcher", "run", str(path), "--output-dir", str(out), "--max-steps",
                          "4", "--strategy", "fsdp", "--nproc-per-node", "2"], capture_output=True, text=True,
                         timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(records[0])
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size <= 280
    gen = subprocess.run([sys.executable, "-m", "launcher", "generate", "--model", str(out / "final"), "--prompt",
                          "def add(", "--max-new-tokens", "8"], capture_output=True, text=True, timeout=120, env=env)
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout.startswith("def add(") and len(gen.stdout.strip()) > len("def add(")
    for noise in ("Failed to load", "Enum subclass"):  # torchao's and pytree's import warnings (runtime/import_noise.py)
        assert noise not in run.stderr + run.stdout + gen.stderr

    # Fine-tuning that model with FSDP: only rank 0 reads it, rank 1 builds on the meta device and receives
    # its shards by broadcast. One step at learning rate 0 must hand back exactly the weights it started from.
    tuned = tmp_path / "tuned"
    run = subprocess.run([sys.executable, "-m", "launcher", "run", str(path), "--output-dir", str(tuned),
                          "--max-steps", "1", "--strategy", "fsdp", "--nproc-per-node", "2",
                          f"model.name_or_path={out / 'final'}", "model.overrides={}", "training.learning_rate=0",
                          "training.warmup_steps=0", "training.eval_steps=null"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    import torch
    from safetensors.torch import load_file

    before, after = load_file(out / "final" / "model.safetensors"), load_file(tuned / "final" / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    from examples import arithmetic
    from launcher.train.sft import format_prompt

    root = tmp_path_factory.mktemp("sft")
    records = arithmetic.make_records(300, seed=0, max_operand=30)
    arithmetic.write_jsonl(records, root / "train.jsonl")
    arithmetic.make_base_model(root / "base", [format_prompt(r["instruction"]) + r["output"] for r in records],
                               hidden_size=32, layers=2)
    return root


def lora_run(root: Path, out: Path, strategy: str, method: str = "lora", *overrides: str) -> list[float]:
    import yaml

    config = {
        "model": {"name_or_path": str(root / "base")},
        "data": {"dataset_format": "alpaca", "train_files": [str(root / "train.jsonl")], "block_size": 96},
        "finetune": {"method": method, "r": 4, "lora_dropout": 0.0},
        "training": {"learning_rate": 1e-2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                     "logging_steps": 1, "save_strategy": "no", "bf16": False, "warmup_steps": 0, "report_to": []},
    }
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    run = subprocess.run([sys.executable, "-m", "launcher", "run", str(path), "--output-dir", str(out), "--max-steps",
                          "4", "--strategy", strategy, "--nproc-per-node", "2", *overrides], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-4000:]
    assert (out / "final" / "adapter_model.safetensors").exists() and not (out / "final" / "model.safetensors").exists()
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_prefix_tuning_runs_under_fsdp_on_one_and_two_ranks_as_under_ddp(sft_data, tmp_path):
    """PEFT registers the base's input embedding a second time in a prefix-tuning model, and saves the prefix by
    running its prompt encoder: FSDP2 must build, shard and save it all the same (same losses, same prefix)."""
    import torch
    from safetensors.torch import load_file

    one_rank = ("--nproc-per-node", "1", "training.gradient_accumulation_steps=2")
    runs = {"ddp": ("ddp",), "fsdp": ("fsdp",), "ddp-1": ("ddp", *one_rank), "fsdp-1": ("fsdp", *one_rank)}
    losses = {name: lora_run(sft_data, tmp_path / name, args[0], "prefix", "finetune.num_virtual_tokens=4",
                             "data.packing=false", *args[1:])
              for name, args in runs.items()}
    assert len(losses["ddp"]) == 4 and losses["ddp"][-1] < losses["ddp"][0]
    for name, reference in (("fsdp", "ddp"), ("fsdp-1", "ddp-1")):
        assert losses[name] == pytest.approx(losses[reference], rel=1e-4), name
        want, got = (load_file(tmp_path / run / "final" / "adapter_model.safetensors") for run in (reference, name))
        assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], atol=1e-5) for k in want), name


def test_lora_runs_to_the_same_losses_under_ddp_fsdp_and_zero3(sft_data, tmp_path):
    """LoRA is a PEFT wrapper around the model: FSDP must still find and shard its decoder layers."""
    losses = {strategy: lora_run(sft_data, tmp_path / strategy, strategy) for strategy in ("ddp", "fsdp", "zero3")}
    assert len(losses["ddp"]) == 4
    for strategy in ("fsdp", "zero3"):
        assert losses[strategy] == pytest.approx(losses["ddp"], rel=1e-3), strategy


def test_qlora_shards_its_4bit_base_under_fsdp_and_zero3_to_the_same_losses_as_ddp(sft_data, tmp_path):
    """bitsandbytes NF4 on CPU, 4-bit weights stored as bf16: FSDP2 and ZeRO-3 split them like any weight (each
    rank holds half of the base) and training follows DDP's replicated base."""
    saving = ("training.save_strategy=steps", "training.save_steps=2")
    losses = {strategy: lora_run(sft_data, tmp_path / strategy, strategy, "qlora", *saving)
              for strategy in ("ddp", "fsdp", "zero3")}
    assert len(losses["ddp"]) == 4 and losses["ddp"][-1] < losses["ddp"][0]
    for strategy in ("fsdp", "zero3"):
        assert losses[strategy] == pytest.approx(losses["ddp"], rel=1e-3), strategy
    # FSDP's sharded checkpoint of step 2 resumes to the very adapter the uninterrupted run ended with.
    resumed = lora_run(sft_data, tmp_path / "resumed", "fsdp", "qlora",
                       f"training.resume_from_checkpoint={tmp_path / 'fsdp' / 'checkpoints' / 'step-2'}")
    assert resumed == losses["fsdp"][2:]
    from safetensors.torch import load_file

    adapter = "final/adapter_model.safetensors"
    a, b = load_file(tmp_path / "fsdp" / adapter), load_file(tmp_path / "resumed" / adapter)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    # and the adapter folds into the (unquantized) base: a plain Hugging Face model
    from transformers import AutoModelForCausalLM

    from launcher.cli import main

    assert main(["export", str(tmp_path / "fsdp" / "final"), "--merge", "--to", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name in merged.state_dict())


def test_sharding_engines_never_build_the_full_model_on_every_rank(sft_data, torchrun_workers, tmp_path):
    """FSDP: rank 1 builds on meta (rank 0 broadcasts). ZeRO-3: zero.Init partitions while the model is built and
    loaded, so each rank holds half, and the halves are exactly the saved weights. DDP holds it all, twice."""
    out = tmp_path / "held.json"
    torchrun_workers(REPO / "tests" / "distributed" / "construction_worker.py", "--model", str(sft_data / "base"),
                     "--out", str(out))
    ranks = json.loads(out.read_text())
    total = ranks[0]["ddp"]["total"]
    assert [r["ddp"]["held"] for r in ranks] == [total, total]
    assert [r["fsdp"]["held"] for r in ranks] == [total, 0]
    assert all(r["zero3"]["total"] == total for r in ranks)
    assert all(abs(r["zero3"]["held"] - total / 2) <= 0.01 * total for r in ranks), [r["zero3"] for r in ranks]
    assert all(r["zero3"]["equal_to_saved"] for r in ranks)
