"""Everything that happens before any process starts: load and check the config, tokenize, plan, write DIR.

Used by `llaunch run` and by the SLURM path alike; it takes plain arguments, never CLI objects. A job
directory (launcher.jobdir.layout) holds the plan and the config (written atomically) and is what every rank reads.
Tokenizing needs transformers (and so torch): a cold token cache and SFT records are prepared by `python -m
launcher.train.prepare_data`, run here as a child process, so this process never loads torch.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from launcher.config import TrainConfig, load_train_config
from launcher.corpus import PackedBlocks, TokenizedCorpus, find_corpus
from launcher.errors import EXIT_USER_ERROR, LaunchError
from launcher.knobs import request_knobs
from launcher.planning.expert_parallel import adapts_experts
from launcher.planning.models import load_model_spec, pretrained_dir
from launcher.planning.parallel import check_tensor_parallel
from launcher.planning.plan import DEEPSPEED_STRATEGIES, ENGINE_SUPPORT, PIPELINED_MODEL_TYPES, Plan, check_runnable
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
    knobs: dict | None = None,
    output_dir: str | Path | None = None,
    hardware=None,
    write: bool = True,
) -> Job:
    """Load + validate the config (positional overrides, then the CLI's config shorthands), build the token
    cache, plan (the CLI's `knobs` over the config's: launcher.knobs), and (unless write=False) write the job dir."""
    notes: list[str] = []
    config = load_train_config(config_path, overrides, flags, notes)
    out = _job_dir(config, output_dir)
    if not config.model.name_or_path:
        raise LaunchError("model.name_or_path is empty; name a catalog model (llaunch plan --list) or a local directory.")
    knobs = request_knobs(config, knobs or {}, notes, str(config_path))
    _check_strategy(config, knobs.get("strategy"))
    if config.finetune.method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        raise LaunchError("finetune.method qlora needs bitsandbytes; pip install 'llaunch[qlora]'.")
    model_dir = pretrained_dir(config.model.name_or_path)
    corpus = _text_corpus(config, model_dir)
    # A model trained from scratch gets the vocabulary of the tokenizer trained on its text (and cached).
    trained_vocab = corpus.meta["vocab_size"] if corpus is not None and model_dir is None else None
    plan = make_job_plan(config, knobs, trained_vocab, hardware=hardware)
    _check_strategy(config, plan.strategy)
    check_runnable(plan)
    if plan.precision == "fp8" and importlib.util.find_spec("torchao") is None:
        raise LaunchError("--precision fp8 trains with torchao's float8 linears; pip install 'llaunch[fp8]'.")
    _check_pipeline(config, plan)
    spec = load_model_spec(config.model.name_or_path, config.model.overrides)
    if plan.parallel.tp_enabled:  # what the ranks' tp plan splits (launcher/train/tensor_parallel.py)
        check_tensor_parallel(spec.model_type, spec.heads, spec.kv_heads, plan.tp)
    if config.finetune.lora_dropout and adapts_experts(spec, plan.method, plan.lora_targets):
        raise LaunchError("PEFT adapts a mixture of experts' fused experts without dropout (its ParamWrapper); set "
                          "finetune.lora_dropout: 0, or leave the experts out of finetune.target_modules.")
    # Checking the data here makes too little text or a bad SFT line (file:line) fail before any rank starts.
    if corpus is not None:
        blocks = PackedBlocks(corpus.tokens(), plan.seq_len, config.data.validation_split_percentage)
        blocks.check(plan.global_batch)
    else:
        prepare_data(config, plan.seq_len, plan.global_batch)

    job = Job(config=config, plan=plan, output_dir=out, notes=notes)
    if write:
        write_job(job)
    return job


def _text_corpus(config: TrainConfig, model_dir: Path | None) -> TokenizedCorpus | None:
    """The run's token cache (None for SFT data), built by the data helper if it is not cached yet."""
    if config.data.dataset_format != "text":
        return None
    return find_corpus(config.data, model_dir) or TokenizedCorpus(Path(prepare_data(config)["corpus"]))


def prepare_data(config: TrainConfig, seq_len: int | None = None, global_batch: int | None = None) -> dict:
    """Run `python -m launcher.train.prepare_data` (found as the ranks find `launcher.train`) and return what it
    reports; its user error becomes this process's one sentence. It writes the cache under a temporary name
    and renames it, so a build that fails or is interrupted leaves no cache entry."""
    request = json.dumps({"config": config.to_dict(), "seq_len": seq_len, "global_batch": global_batch})
    done = subprocess.run([sys.executable, "-m", "launcher.train.prepare_data"], input=request,
                          stdout=subprocess.PIPE, text=True)
    if done.returncode not in (0, EXIT_USER_ERROR):
        raise LaunchError(f"preparing the training data failed (python -m launcher.train.prepare_data exited "
                          f"{done.returncode}; its error is above); fix what it names and run again.")
    report = json.loads(done.stdout.splitlines()[-1])
    if "error" in report:
        raise LaunchError(report["error"])
    return report


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


def make_job_plan(config: TrainConfig, knobs: dict, vocab_size: int | None, hardware=None) -> Plan:
    """Ask the planner, forcing the knobs (launcher.knobs.request_knobs: the config's and the flags');
    the others are the planner's to choose."""
    from launcher.planning.hardware import probe
    from launcher.planning.planner import PlanRequest, make_plan

    overrides = dict(config.model.overrides)
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    request = PlanRequest(model=config.model.name_or_path, model_overrides=overrides, **knobs,
                          runnable_only=True)  # only what the ranks' engines run (plan.check_runnable)
    return make_plan(request, hardware if hardware is not None else probe())


def _check_pipeline(config: TrainConfig, plan: Plan) -> None:
    """Pipeline stages cut the decoders they know, at least one decoder layer each (the planner may count the
    embedding and the head as a stage's layer, the ranks do not), and take packed text blocks, whose
    micro-batches all have the one shape a pipeline schedule sends between stages."""
    if not plan.parallel.pp_enabled:
        return
    spec = load_model_spec(config.model.name_or_path, config.model.overrides)
    if spec.model_type not in PIPELINED_MODEL_TYPES or config.data.dataset_format != "text":
        raise LaunchError(f"pipeline parallelism trains {', '.join(PIPELINED_MODEL_TYPES)} models on text data, "
                          f"not a {spec.model_type} model on {config.data.dataset_format} data; use --pp 1.")
    if plan.parallel.stages > spec.layers:
        raise LaunchError(f"the ranks give each of the {plan.parallel.stages} pipeline stages at least one of the "
                          f"model's {spec.layers} layers; choose pp x virtual stages <= {spec.layers}.")


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
