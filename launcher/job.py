"""Everything that happens before any process starts: load and check the config, tokenize, plan, write DIR.

Used by `llaunch run` and by the SLURM path alike; it takes plain arguments, never CLI objects. A job
directory holds plan.yaml and config.yaml (written atomically) and is what every rank reads.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

from launcher.config import TrainConfig, load_train_config
from launcher.errors import LaunchError
from launcher.plan import Plan

PLAN_FILE, CONFIG_FILE, FINAL_DIR = "plan.yaml", "config.yaml", "final"
# training.optim (HF names) -> the estimator's optimizer; Adafactor's factored state is below SGD momentum's.
PLANNED_OPTIMIZER = {"adamw_torch_fused": "adamw", "adamw_torch": "adamw", "sgd": "sgd", "adafactor": "sgd",
                     "adamw_bnb_8bit": "adamw-8bit", "paged_adamw_8bit": "adamw-8bit"}


@dataclass
class Job:
    config: TrainConfig
    plan: Plan
    output_dir: Path


def prepare_job(
    config_path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    output_dir: str | Path | None = None,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    hardware=None,
) -> Job:
    """Load + validate the config, build the token cache, plan, and write DIR/plan.yaml and DIR/config.yaml."""
    from launcher.train.data import PackedBlocks, build_corpus
    from launcher.train.modeling import pretrained_dir

    config = load_train_config(config_path, overrides)
    training = config.training
    if not (output_dir or training.output_dir):
        raise LaunchError("no output directory; pass --output-dir DIR or set training.output_dir.")
    out = Path(output_dir or training.output_dir).expanduser().resolve()
    training.output_dir = str(out)
    if not config.model.name_or_path:
        raise LaunchError("model.name_or_path is empty; name a catalog model (llaunch plan --list) or a local directory.")
    _check_strategy(config, config.parallel.strategy)
    _check_output_dir(out, training.overwrite_output_dir)
    if training.resume_from_checkpoint or (training.ignore_checkpoints and not training.overwrite_output_dir):
        from launcher.train.checkpoint import resolve_resume

        # Refuse a bad --resume-from or a fresh start over checkpoints before any rank starts.
        resolve_resume(out, training.resume_from_checkpoint, training.ignore_checkpoints, overwrite=False)

    model_dir = pretrained_dir(config.model)
    if config.finetune.method == "qlora":
        from launcher.train.adapters import quantization_config

        quantization_config(config.finetune)  # no GPU or no bitsandbytes: one sentence, before any rank starts
    if config.data.dataset_format == "text":
        corpus = build_corpus(config.data, model_dir)
        plan = make_job_plan(config, corpus.meta["vocab_size"] if model_dir is None else None,
                             nodes=nodes, gpus_per_node=gpus_per_node, hardware=hardware)
        _check_strategy(config, plan.strategy)
        PackedBlocks(corpus.tokens(), plan.seq_len, config.data.validation_split_percentage).check(plan.global_batch)
    else:  # SFT JSONL: reading it here makes a bad line (file:line) fail before any rank starts
        from launcher.train.sft import SFTCorpus

        plan = make_job_plan(config, None, nodes=nodes, gpus_per_node=gpus_per_node, hardware=hardware)
        _check_strategy(config, plan.strategy)
        SFTCorpus.from_config(config.data, model_dir, plan.seq_len, training.seed).check(plan.global_batch)

    if training.overwrite_output_dir and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    config.save(out / CONFIG_FILE)
    plan.save(out / PLAN_FILE)
    return Job(config=config, plan=plan, output_dir=out)


def make_job_plan(config: TrainConfig, vocab_size: int | None, *, nodes: int | None = None,
                  gpus_per_node: int | None = None, hardware=None) -> Plan:
    """Ask the planner, forcing whatever the config sets; None fields are the planner's to choose."""
    from launcher.hardware import probe
    from launcher.planner import PlanRequest, make_plan

    training, parallel = config.training, config.parallel
    overrides = dict(config.model.overrides)
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    request = PlanRequest(
        model=config.model.name_or_path,
        model_overrides=overrides,
        nodes=nodes,
        gpus_per_node=gpus_per_node or parallel.nproc_per_node,
        strategy=parallel.strategy,
        offload=parallel.offload,
        micro_batch=training.per_device_train_batch_size,
        global_batch=training.global_batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        precision=config.requested_precision,
        activation_checkpointing=training.gradient_checkpointing,
        attention=config.model.attn_implementation or "sdpa",
        method="full" if config.finetune.method == "prefix" else config.finetune.method,
        lora_r=config.finetune.r,
        lora_targets=config.finetune.target_modules,
        optimizer=PLANNED_OPTIMIZER[training.optim],
    )
    if config.data.block_size is not None:
        request.seq_len = config.data.block_size
    return make_plan(request, hardware if hardware is not None else probe())


def _check_strategy(config: TrainConfig, strategy: str | None) -> None:
    """What a strategy cannot do, refused before any rank starts."""
    if config.finetune.method == "qlora" and strategy not in (None, "ddp"):
        raise LaunchError(f"QLoRA runs under DDP (its 4-bit base is replicated, only the adapter trains), "
                          f"not {strategy}; drop --strategy, or use finetune.method lora with {strategy}.")
    if not (strategy and strategy.startswith("zero")):
        return
    if importlib.util.find_spec("deepspeed") is None:
        raise LaunchError(f"strategy {strategy} needs DeepSpeed, which is not installed; "
                          "pip install 'llaunch[deepspeed]' or use --strategy fsdp.")
    if config.training.max_grad_value > 0:
        raise LaunchError(f"DeepSpeed ({strategy}) clips gradients only by norm; drop training.max_grad_value "
                          "or use --strategy fsdp.")
    if config.training.torch_compile:
        raise LaunchError(f"training.torch_compile is supported with DDP and FSDP, not DeepSpeed ({strategy}); "
                          "drop it or use --strategy fsdp.")


def _check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise LaunchError(f"output directory {out} is a file; choose another --output-dir.")
    if not overwrite and (out / FINAL_DIR).exists():
        raise LaunchError(f"{out} already holds a finished run; pass --overwrite or choose another --output-dir.")
