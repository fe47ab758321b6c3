"""Everything that happens before any process starts: load and check the config, tokenize, plan, write DIR.

Used by `llaunch run` and by the SLURM path alike; it takes plain arguments, never CLI objects. A job
directory (launcher.jobdir.layout) holds the plan and the config (written atomically) and is what every rank reads.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from launcher.config import TrainConfig, load_train_config
from launcher.errors import LaunchError
from launcher.planning.plan import DEEPSPEED_STRATEGIES, ENGINE_SUPPORT, Plan, check_runnable
from launcher.jobdir.layout import JobDir
from launcher.jobdir.run_lock import RunLock


@dataclass
class Job:
    config: TrainConfig
    plan: Plan
    output_dir: Path
    notes: list[str] = field(default_factory=list)  # flags that replaced config values, said once DIR is written


def prepare_job(
    config_path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    flags: list[tuple[str, str]] | tuple = (),
    output_dir: str | Path | None = None,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    hardware=None,
    write: bool = True,
) -> Job:
    """Load + validate the config (positional overrides, then the CLI's flags: launcher.flag_overrides), build
    the token cache, plan, and (unless write=False) write the job dir."""
    from launcher.train.data import build_corpus
    from launcher.train.modeling import pretrained_dir
    from launcher.train.training_data import load_training_data

    notes: list[str] = []
    config = load_train_config(config_path, overrides, flags, notes)
    out = _job_dir(config, output_dir)
    if not config.model.name_or_path:
        raise LaunchError("model.name_or_path is empty; name a catalog model (llaunch plan --list) or a local directory.")
    _check_strategy(config, config.parallel.strategy)
    model_dir = pretrained_dir(config.model)
    if config.finetune.method == "qlora":
        from launcher.train.adapters import quantization_config

        quantization_config(config.finetune)  # no GPU or no bitsandbytes: one sentence, before any rank starts
    # A model trained from scratch gets the vocabulary of the tokenizer trained on its text (and cached).
    trained_vocab = (build_corpus(config.data, model_dir).meta["vocab_size"]
                     if config.data.dataset_format == "text" and model_dir is None else None)
    plan = make_job_plan(config, trained_vocab, nodes=nodes, gpus_per_node=gpus_per_node, hardware=hardware)
    _check_strategy(config, plan.strategy)
    check_runnable(plan)
    # Loading the data here makes a bad SFT line (file:line) or too little text fail before any rank starts.
    load_training_data(config, plan.seq_len).check(plan.global_batch)

    job = Job(config=config, plan=plan, output_dir=out, notes=notes)
    if write:
        write_job(job)
    return job


def _job_dir(config: TrainConfig, output_dir: str | Path | None) -> Path:
    """The run's directory (into training.output_dir), refused before anything is written where a run may not
    write, and with a bad --resume-from or a fresh start over checkpoints refused too."""
    training = config.training
    if not (output_dir or training.output_dir):
        raise LaunchError("no output directory; pass --output-dir DIR or set training.output_dir.")
    out = Path(output_dir or training.output_dir).expanduser().resolve()
    training.output_dir = str(out)
    _check_output_dir(out)
    resume_from = training.resume_from_checkpoint
    if training.overwrite_output_dir and resume_from and out in Path(resume_from).expanduser().resolve().parents:
        raise LaunchError(f"--resume-from {resume_from} lies in {out}, which --overwrite would remove first; drop "
                          f"--overwrite to resume there, or copy the checkpoint out of it first.")
    if resume_from or (training.ignore_checkpoints and not training.overwrite_output_dir):
        from launcher.jobdir.checkpoint_store import resolve_resume

        resolve_resume(out, resume_from, training.ignore_checkpoints, overwrite=False)
    if not training.overwrite_output_dir and JobDir(out).final.exists() and not _extendable(out, training):
        raise LaunchError(f"{out} already holds a finished run and no checkpoint to continue it from; pass "
                          f"--overwrite to train it again, or choose another --output-dir.")
    return out


def _extendable(out: Path, training) -> bool:
    """A finished run goes on (more max_steps) from --resume-from or its newest complete checkpoint."""
    from launcher.jobdir.checkpoint_store import list_checkpoints

    return not training.ignore_checkpoints and bool(
        training.resume_from_checkpoint or any(info.complete for info in list_checkpoints(out)))


def write_job(job: Job, keep_lock: bool = False) -> RunLock | None:
    """DIR/plan.yaml and DIR/config.yaml, written under DIR's run lock (an earlier run is removed first with
    training.overwrite_output_dir; nothing else ever is). With keep_lock the lock is returned still held, for
    a caller that trains here and now (`llaunch run`); a SLURM job's ranks take it themselves."""
    out = job.output_dir
    lock = RunLock.acquire(out)  # creates DIR; another run there keeps it, and this refuses naming that run
    try:
        if job.config.training.overwrite_output_dir and is_run_dir(out):
            _remove_run(out)
        job.config.save(JobDir(out).config)
        job.plan.save(JobDir(out).plan)
    except BaseException:
        lock.release()
        raise
    for note in job.notes:  # the job passed every check and is about to start: say what the flags replaced
        print(note, file=sys.stderr)
    if keep_lock:
        return lock
    lock.release()
    return None


def is_run_dir(path: Path) -> bool:
    """A directory llaunch made for a run: it holds the plan and the config that `llaunch run` writes first."""
    return JobDir(path).plan.is_file() and JobDir(path).config.is_file()


def make_job_plan(config: TrainConfig, vocab_size: int | None, *, nodes: int | None = None,
                  gpus_per_node: int | None = None, hardware=None) -> Plan:
    """Ask the planner, forcing whatever the config sets; None fields are the planner's to choose."""
    from launcher.planning.hardware import probe
    from launcher.planning.planner import PlanRequest, make_plan

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
        method=config.finetune.method,
        lora_r=config.finetune.r,
        lora_targets=config.finetune.target_modules,
        optimizer=training.optim,
        loss_chunk_tokens=training.loss_chunk_tokens,
        optimizer_in_backward=training.optimizer_in_backward,
        runnable_only=True,  # only what the ranks' engines run (launcher.planning.plan.check_runnable)
    )
    if config.data.block_size is not None:
        request.seq_len = config.data.block_size
    return make_plan(request, hardware if hardware is not None else probe())


def _check_strategy(config: TrainConfig, strategy: str | None) -> None:
    """What a strategy cannot do, refused before any rank starts."""
    support = ENGINE_SUPPORT.get(strategy)
    if not support:
        return
    if strategy in DEEPSPEED_STRATEGIES and importlib.util.find_spec("deepspeed") is None:
        raise LaunchError(f"strategy {strategy} needs DeepSpeed, which is not installed; "
                          "pip install 'llaunch[deepspeed]' or use --strategy fsdp.")
    if config.training.max_grad_value > 0 and not support.clip_grad_value:
        raise LaunchError(f"DeepSpeed ({strategy}) clips gradients only by norm; drop training.max_grad_value "
                          "or use --strategy fsdp.")
    if config.training.torch_compile and not support.compile:
        able = ", ".join(s for s, can in ENGINE_SUPPORT.items() if can.compile)
        raise LaunchError(f"training.torch_compile is supported with {able}, not {strategy}; "
                          "drop it or use --strategy fsdp.")


def _check_output_dir(out: Path) -> None:
    """An output directory is new, empty, or a llaunch run: a run never writes into (or removes) anything else."""
    if out.exists() and not out.is_dir():
        raise LaunchError(f"output directory {out} is a file; choose another --output-dir.")
    under = next((p for p in out.parents if p.exists()), None)
    if under is not None and not under.is_dir():
        raise LaunchError(f"output directory {out} is under the file {under}; choose another --output-dir.")
    if out.is_dir() and not is_run_dir(out) and _entries(out):
        raise LaunchError(f"{out} already holds files and is not a llaunch run directory (no {JobDir(out).plan.name} and "
                          f"{JobDir(out).config.name}), so llaunch will neither write into nor remove it; choose a new "
                          f"or empty --output-dir.")


def _entries(out: Path) -> list[Path]:
    """What a directory holds besides the run lock (which a run that failed before writing leaves alone)."""
    return sorted(p for p in out.iterdir() if p != JobDir(out).lock)


def _remove_run(out: Path) -> None:
    """--overwrite: remove an earlier run (only ever one `is_run_dir` accepts), naming what goes; the lock stays."""
    entries = _entries(out)
    print(f"llaunch: --overwrite removes the earlier run in {out}: "
          f"{', '.join(p.name + ('/' if p.is_dir() else '') for p in entries)}", file=sys.stderr)
    try:
        for entry in entries:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    except OSError as err:
        raise LaunchError(f"cannot remove the earlier run in {out} ({err.strerror or err}); "
                          "fix its permissions or choose another --output-dir.") from None
