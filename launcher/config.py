"""The train config (`TrainConfig`, one `*Section` dataclass per YAML section) <-> YAML, `section.key=value`
overrides, strict validation.

Keys follow Hugging Face TrainingArguments names where one exists, so a user's HF habits carry over.
`None` means "the planner (or a sensible rule) chooses"; a value set here is respected as forced. The keys
that are planner knobs are rows of launcher.knobs, with their flags; their unset default is TrainSetup's.
Unknown keys and wrong types fail here, before any process starts.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from launcher.errors import LaunchError
from launcher.config_values import check_choice, check_numbers, check_type, reject_unknown
from launcher.files import write_text_atomic
from launcher.knobs import check_config_knobs
from launcher.planning.plan import LORA_R, LOSS_CHUNK_TOKENS
from launcher.runtime.signals import DEFAULT_SIGNALS
from launcher.runtime.watchdog_config import check_settings


@dataclass
class ModelSection:
    """Which model to train: a catalog name/alias for `launcher.planning.models`, or a local Hugging Face directory."""

    name_or_path: str = ""
    # Changes to the architecture (e.g. {num_hidden_layers: 4}); only for random-init models.
    overrides: dict = field(default_factory=dict)
    attn_implementation: str | None = None  # sdpa | eager | flash (flash_attention_2); None: TrainSetup.attention, sdpa


@dataclass
class DataSection:
    """Pretraining text: files or directories, tokenized once into a cache and packed into blocks."""

    train_files: list[str] = field(default_factory=list)  # files, directories, or @stdlib (Python's own source)
    file_pattern: str = "*.txt"  # glob used inside directories
    max_train_bytes: int | None = None  # read at most this much text (files in sorted order)
    tokenizer_name_or_path: str | None = None  # None: the model's own, else a BPE trained on the data
    vocab_size: int = 8192  # for the trained BPE tokenizer
    block_size: int | None = None  # sequence length; None: planner (seq_len)
    validation_split_percentage: float = 5.0  # HF run_clm name: blocks held out for eval
    max_eval_samples: int | None = None  # cap on eval blocks per evaluation
    cache_dir: str | None = None  # None: $LLAUNCH_CACHE or ~/.cache/llaunch
    # Supervised fine-tuning (launcher/train/sft.py): JSONL records instead of plain text.
    dataset_format: str = "text"  # text (pretraining) | alpaca | chat | jsonl (alpaca or chat, per line)
    eval_files: list[str] = field(default_factory=list)  # SFT held-out JSONL; empty: validation_split_percentage
    packing: bool = True  # SFT: several examples per row, attention kept inside each example
    on_bad_line: str = "fail"  # SFT: fail | skip (with a file:line warning)


@dataclass
class TrainingSection:
    """The optimisation: Hugging Face TrainingArguments names and meanings."""

    output_dir: str | None = None
    overwrite_output_dir: bool = False
    seed: int = 42
    data_seed: int | None = None  # None: seed
    learning_rate: float = 3e-4
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    optim: str = "adamw_torch_fused"  # one of launcher.planning.plan.OPTIMIZERS (HF names)
    lr_scheduler_type: str = "cosine"
    lr_scheduler_kwargs: dict = field(default_factory=dict)  # e.g. {num_cycles: 2}, {step_size: 100, gamma: 0.5}
    group_by_length: bool = False  # SFT without packing: batches of similar length, padded to the longest
    warmup_ratio: float = 0.0
    warmup_steps: int = 0  # wins over warmup_ratio when > 0
    max_grad_norm: float = 1.0
    max_grad_value: float = 0.0  # > 0: clamp every gradient element to [-v, v] before norm clipping (DDP/FSDP)
    torch_compile: bool = False  # torch.compile each decoder layer: faster steps after a slower first one
    num_train_epochs: float = 1.0
    max_steps: int = -1  # > 0 wins over num_train_epochs
    per_device_train_batch_size: int | None = None  # None: planner (micro batch)
    gradient_accumulation_steps: int | None = None  # None: planner
    global_batch_size: int | None = None  # sequences per optimizer step; planner splits it
    per_device_eval_batch_size: int | None = None  # None: per_device_train_batch_size
    bf16: bool | None = None  # None: planner picks the precision for the hardware
    fp16: bool | None = None
    tf32: bool | None = None  # None: on where the GPU supports it
    # Activation checkpointing: none | selective | full (true / false: full / none); None: the planner decides.
    gradient_checkpointing: bool | str | None = None
    logging_steps: int = 10
    logging_first_step: bool = False
    eval_steps: int | None = None  # None: no evaluation during training, one at the end
    save_strategy: str = "steps"  # steps | epoch | no
    save_steps: int = 500
    save_total_limit: int | None = None
    resume_from_checkpoint: str | None = None  # a checkpoint dir; None: latest in output_dir
    ignore_checkpoints: bool = False  # --no-resume: start fresh even if checkpoints exist
    metric_for_best_model: str = "eval_loss"
    greater_is_better: bool = False
    async_save: bool = False  # DDP/FSDP: the step blocks only for the copy to host memory; files written behind
    preemption_signals: list[str] = field(default_factory=lambda: list(DEFAULT_SIGNALS))
    early_stopping_patience: int | None = None
    early_stopping_threshold: float = 0.0
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    save_interval_s: float | None = None  # save every N seconds of training instead of every save_steps
    save_overhead_cap: float = 0.05  # save_strategy auto: blocking saves take at most this share of the time
    # The causal-LM loss from the last hidden states, this many tokens at a time, never the full logits
    # (launcher/train/chunked_loss.py); 0: the model's own loss over the full [tokens, vocab] logits.
    loss_chunk_tokens: int = LOSS_CHUNK_TOKENS
    # Each weight's optimizer step runs in backward as soon as its gradient is ready, and the gradient is freed:
    # the full set of gradients never exists (torchtune's optimizer_in_bwd). One process, no accumulation, no
    # clipping (no global norm exists before the steps).
    optimizer_in_backward: bool = False


@dataclass
class FinetuneSection:
    """How to fine-tune: the method and its PEFT (LoraConfig, PrefixTuningConfig) / BitsAndBytesConfig keys."""

    method: str = "full"  # full | lora | qlora | prefix
    r: int = LORA_R
    lora_alpha: int = 2 * LORA_R
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    bias: str = "none"  # none | all | lora_only
    modules_to_save: list[str] = field(default_factory=list)  # e.g. [lm_head, embed_tokens]: trained in full
    layers_to_transform: list[int] = field(default_factory=list)  # empty: every layer
    num_virtual_tokens: int = 20  # prefix tuning
    bnb_4bit_quant_type: str = "nf4"  # qlora: nf4 | fp4
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: str = "bfloat16"


@dataclass
class ParallelSection:
    """How to spread the job; None: the planner decides from hardware and memory. Each key is a knob of
    launcher.knobs, with the same flag in `plan`, `run` and `submit`."""

    strategy: str | None = None  # ddp | fsdp | hsdp | zero1 | zero2 | zero3
    offload: str | None = None  # none | optimizer | optimizer+params
    nproc_per_node: int | None = None  # None: all visible GPUs, or one CPU process
    # The parallelism record's degrees (launcher.planning.parallel); None: the planner's. `llaunch run` and
    # `submit` run data parallelism only for now, and refuse a layout in one sentence.
    tp: int | None = None
    pp: int | None = None
    cp: int | None = None
    ep: int | None = None
    etp: int | None = None
    pp_schedule: str | None = None
    pp_virtual_stages: int | None = None
    sequence_parallel: bool | None = None
    deepspeed: dict = field(default_factory=dict)  # keys merged over the rendered ds_configs template


@dataclass
class SupervisionSection:
    """How the node runtime watches the ranks. Unset keys take the cluster profile's values, then the defaults;
    the variables LLAUNCH_DIST_TIMEOUT_S and LLAUNCH_WATCHDOG override both (launcher.env)."""

    dist_timeout_s: int | None = None  # a collective waiting longer fails the job; None: the profile's, else torch's
    watchdog: dict = field(default_factory=dict)  # WatchdogConfig keys, e.g. {floor_s: 60}; {enabled: false}: off


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    supervision: SupervisionSection = field(default_factory=SupervisionSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> "TrainConfig":
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise LaunchError(f"{source} must be a YAML mapping with sections {', '.join(_SECTIONS)}.")
        reject_unknown(data, _SECTIONS, source)
        sections = {}
        for name, section_cls in _SECTIONS.items():
            values = data.get(name) or {}
            if not isinstance(values, dict):
                raise LaunchError(f"{source}: section '{name}' must be a mapping of keys to values.")
            sections[name] = _build_section(section_cls, values, f"{name}", source)
        return cls(**sections).validate()

    def validate(self) -> "TrainConfig":
        t = self.training
        if t.bf16 and t.fp16:
            raise LaunchError("training.bf16 and training.fp16 are both true; choose one.")
        if t.save_strategy not in ("steps", "epoch", "no", "auto"):
            raise LaunchError(f"training.save_strategy {t.save_strategy!r} is not one of steps, epoch, no, auto.")
        if t.save_interval_s is not None and not 0 < t.save_interval_s < math.inf:
            raise LaunchError(f"training.save_interval_s must be a positive number of seconds, not {t.save_interval_s!r}.")
        if t.save_interval_s is not None and t.save_strategy != "steps":
            raise LaunchError(f"training.save_interval_s saves by time and save_strategy {t.save_strategy} decides "
                              f"otherwise; remove one of them.")
        if t.optimizer_in_backward and (t.max_grad_norm > 0 or t.max_grad_value > 0):
            raise LaunchError("training.optimizer_in_backward steps each weight before the gradient norm of the "
                              "whole model exists, so it cannot clip; set training.max_grad_norm: 0 and max_grad_value: 0.")
        if not 0 <= self.data.validation_split_percentage < 100:
            raise LaunchError("data.validation_split_percentage must be in [0, 100).")
        check_numbers(self)
        check_config_knobs(self)  # the planner's knobs, by the rule the flags follow
        check_settings(self.supervision.watchdog, "supervision.watchdog")
        check_choice("data.dataset_format", self.data.dataset_format, ("text", "alpaca", "chat", "jsonl"))
        check_choice("data.on_bad_line", self.data.on_bad_line, ("fail", "skip"))
        f = self.finetune
        check_choice("finetune.bias", f.bias, ("none", "all", "lora_only"))
        check_choice("finetune.bnb_4bit_quant_type", f.bnb_4bit_quant_type, ("nf4", "fp4"))
        check_choice("finetune.bnb_4bit_compute_dtype", f.bnb_4bit_compute_dtype, ("bfloat16", "float16", "float32"))
        if f.num_virtual_tokens < 1:
            raise LaunchError("finetune.num_virtual_tokens must be at least 1.")
        if f.method == "prefix" and self.data.packing and self.data.dataset_format != "text":
            # The prefix is a KV cache, and transformers keeps packed examples apart only without one.
            raise LaunchError("finetune.method prefix cannot keep packed examples apart; set data.packing: false.")
        return self

    @property
    def requested_precision(self) -> str | None:
        """The Plan precision the HF booleans ask for, or None to let the planner choose."""
        t = self.training
        if t.bf16:
            return "amp-bf16"
        if t.fp16:
            return "amp-fp16"
        if t.bf16 is False and t.fp16 is False:
            return "fp32"
        return None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, self.to_yaml())

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        return load_train_config(path)


_SECTIONS = {"model": ModelSection, "data": DataSection, "training": TrainingSection, "parallel": ParallelSection,
             "finetune": FinetuneSection, "supervision": SupervisionSection}


def load_train_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                      flags: list[tuple[str, str]] | tuple = (), notes: list[str] | None = None) -> TrainConfig:
    """Read YAML, apply `section.key=value` overrides (values parsed as YAML), then the CLI flags' overrides as
    (flag, override) pairs, which win; validate. Where a flag replaced what the YAML or an override set, a
    sentence saying so goes into `notes`, for the caller to print once the job has passed every check."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LaunchError(f"config file {path} does not exist; pass the path of a train YAML (see examples/).") from None
    except UnicodeDecodeError:
        raise LaunchError(f"config file {path} is not UTF-8 text; pass the path of a train YAML (see examples/).") from None
    except OSError as err:  # a directory, an unreadable file
        raise LaunchError(f"cannot read config file {path} ({err.strerror or err}); pass the path of a train YAML.") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise LaunchError(f"config file {path} is not valid YAML{where}; fix the syntax.") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LaunchError(f"config file {path} must be a YAML mapping with sections {', '.join(_SECTIONS)}.")
    for item in overrides:
        apply_override(data, item)
    for flag, item in flags:
        key, before, after = apply_override(data, item)
        if before is not None and before != after and notes is not None:
            notes.append(f"llaunch: {flag} overrides {key}: {before} set by {path} or its overrides.")
    config = TrainConfig.from_dict(data, source=str(path))
    # Relative data paths are relative to the config file, so a config works from any directory.
    config.data.train_files = [p if p.startswith("@") else str(_resolve(p, path.parent)) for p in config.data.train_files]
    config.data.eval_files = [str(_resolve(p, path.parent)) for p in config.data.eval_files]
    if config.model.name_or_path and Path(config.model.name_or_path).expanduser().is_dir():
        # A local model directory (relative to where llaunch runs) is recorded absolute, so ranks, SLURM jobs
        # and saved adapters (their base_model_name_or_path) find it from any working directory.
        config.model.name_or_path = str(Path(config.model.name_or_path).expanduser().resolve())
    if config.data.tokenizer_name_or_path and Path(path.parent, config.data.tokenizer_name_or_path).exists():
        config.data.tokenizer_name_or_path = str(_resolve(config.data.tokenizer_name_or_path, path.parent))
    return config


def apply_override(data: dict, item: str) -> tuple[str, Any, Any]:
    """`training.learning_rate=1e-4` -> data['training']['learning_rate'] = 1e-4; (key, value it replaced or
    None, new value)."""
    key, sep, raw = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise LaunchError(f"override {item!r} must look like section.key=value, e.g. training.max_steps=100.")
    section, name = parts
    reject_unknown({section: None}, _SECTIONS, "override")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    current = data.get(section)
    if current is None:
        current = data[section] = {}
    if not isinstance(current, dict):
        raise LaunchError(f"section '{section}' must be a mapping of keys to values.")
    before, current[name] = current.get(name), value
    return f"{section}.{name}", before, value


def _resolve(value: str, base: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def _build_section(section_cls: type, values: dict, name: str, source: str):
    hints = typing.get_type_hints(section_cls)
    fields = {f.name for f in dataclasses.fields(section_cls)}
    reject_unknown(values, fields, f"{source}: {name}")
    for key, value in values.items():
        values[key] = check_type(value, hints[key], f"{name}.{key}", source)
    return section_cls(**values)
