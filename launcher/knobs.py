"""The knob table: each planner / training knob declared once, with its train-config key, its CLI flag (the same
spelling in `plan`, `run` and `submit`), its PlanRequest / Plan field, its default and its value rule.

The commands' flags are generated from it (`add_knob_flags`), and the planner's request is filled from it
(`cli_knobs` for the flags, `config_knobs` for the config, `request_knobs` for both, the flags winning): no
command maps a flag or a config key to a Plan field by hand. A knob's default is its TrainSetup field's (the
planner chooses the `planner` knobs left unset); its value rule is `launcher.planning.plan.check_knob`
(choices, counts) plus the row's parser for what a flag spells as text (byte sizes, token counts, lists).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Callable

from launcher.errors import LaunchError
from launcher.planning.plan import CHOICES, TrainSetup, check_knob, recompute_mode
from launcher.units import parse_bytes

PLAN, RUN, SUBMIT, LR_FIND, DOCTOR, CLUSTER = "plan", "run", "submit", "lr-find", "doctor", "cluster"
PLANNED = (PLAN, RUN, SUBMIT)  # the commands that plan a job (run: on this node)
TRAINED = (*PLANNED, LR_FIND)  # and lr-find, which trains one rank in this process
DESCRIBED = (PLAN, SUBMIT)  # the commands that plan for nodes described (flags, a profile) rather than probed
GROUPS = {
    "hardware": "hardware (default: the nodes this runs on, or the cluster profile's)",
    "knobs": "knobs (default: the planner chooses, or the config's key, else the default shown)",
    "layout": "layout (default: the planner chooses; `llaunch run` runs data parallelism only)",
    "config": "config shorthands (each sets one train-config key, over the YAML and its overrides)",
    "allocation": "allocation (default: the cluster profile's)",
}


def parse_list(text: str, label: str) -> list[str]:
    """'q_proj,v_proj' -> ['q_proj', 'v_proj']."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise LaunchError(f"{label} {text!r} names nothing; write all-linear or a comma list like q_proj,v_proj.")
    return items


def parse_global_batch(text: str, label: str) -> dict[str, int]:
    """'64' -> sequences per optimizer step; '524288tok' -> tokens per step (the request's two fields)."""
    lowered = str(text).strip().lower()
    number = lowered.removesuffix("tokens").removesuffix("tok")
    if not number.isdigit() or int(number) < 1:
        raise LaunchError(f"{label} {text!r} must be a positive count of sequences, or of tokens like 524288tok.")
    return {"global_batch_tokens" if number != lowered else "global_batch": int(number)}


@dataclass(frozen=True)
class Knob:
    """One row: `field` is the PlanRequest field (and the Plan's, through TrainSetup, unless only a request has
    it), or, for a config shorthand (`plans` false), the argparse dest of a flag that sets `config`."""

    field: str
    flag: str
    help: str
    config: str | None = None  # "section.key" in the train config; a bare name is a TrainConfig property
    aliases: tuple[str, ...] = ()
    commands: tuple[str, ...] = PLANNED
    group: str = "knobs"
    type: Callable = str  # what argparse converts the text with
    # (value, flag) -> value, applied in the mapping so a bad one is a LaunchError; a dict is several request
    # fields (--global-batch: sequences, or tokens with a 'tok' suffix).
    parse: Callable | None = None
    switch: bool = False  # a flag without a value: it sets True
    negatable: bool = False  # a boolean flag with its --no- form
    optional: Any = None  # the value of the flag written without one (nargs="?")
    negation: tuple[str, Any] | None = None  # (--no-X flag, the value it sets)
    metavar: str | None = None  # what --help shows for the value (counts: N)
    planner: bool = False  # unset, the planner (or the hardware) chooses it; else TrainSetup's default holds
    plans: bool = True  # False: a config shorthand, not a planner knob

    @property
    def has_yaml_key(self) -> bool:
        """Its config is a key a YAML sets (section.key), not a TrainConfig property derived from others."""
        return bool(self.config) and "." in self.config

    @property
    def value_name(self) -> str | None:
        """What --help shows for the value: the choices themselves, N for a count, else the field's name."""
        return None if self.choices else self.metavar or ("N" if self.type is int else self.field.upper())

    @property
    def choices(self) -> tuple | None:
        return CHOICES.get(self.field)

    @property
    def default(self) -> Any:
        """What holds when neither the flag nor the config sets it: None where the planner chooses."""
        fields = {f.name: f for f in dataclasses.fields(TrainSetup)}
        if self.planner or not self.plans or self.field not in fields:
            return None
        f = fields[self.field]
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

    def help_text(self) -> str:
        where = f"; config {self.config}" if self.config else ""
        chooser = "what the hardware or the cluster profile has" if self.group == "hardware" else "the planner chooses"
        default = chooser if self.planner else self.default
        return f"{self.help}{where}" + (f" (default: {default})" if self.plans and default is not None else "")


def _count(field: str, flag: str, help: str, **kw) -> Knob:
    return Knob(field, flag, help, type=int, **kw)


KNOBS = (
    _count("gpus_per_node", "--gpus-per-node", "GPUs per node (on CPU: processes); submit: 0 = CPU nodes on gloo",
           config="parallel.nproc_per_node", aliases=("--gpus", "--nproc-per-node"), group="hardware", planner=True),
    _count("nodes", "--nodes", "number of nodes", commands=(*DESCRIBED, DOCTOR, CLUSTER), group="hardware",
           planner=True),
    # The GPU model is probed by `run` and read from the cluster profile by `submit`.
    Knob("gpu", "--gpu", "GPU model for peak FLOP/s and bandwidth (H100, A100-40GB, L40S, ...)", commands=(PLAN,),
         group="hardware"),
    Knob("gpu_mem_bytes", "--gpu-mem", "memory per GPU, e.g. 80GiB or 40GB", commands=(PLAN,), group="hardware",
         parse=parse_bytes, metavar="SIZE"),
    Knob("device", "--device", "cpu: plan N gloo processes on this machine's CPU (what `run` does without a GPU)",
         commands=(PLAN,), group="hardware", planner=True),
    Knob("strategy", "--strategy", "the data-parallel strategy", config="parallel.strategy", commands=TRAINED,
         planner=True),
    Knob("offload", "--offload", "what lives in host memory", config="parallel.offload", planner=True),
    _count("micro_batch", "--micro-batch", "sequences per rank per forward",
           config="training.per_device_train_batch_size", commands=TRAINED, planner=True),
    Knob("global_batch", "--global-batch", "sequences per optimizer step, or tokens with a 'tok' suffix (524288tok)",
         config="training.global_batch_size", commands=TRAINED, parse=parse_global_batch, metavar="N|Ntok"),
    _count("gradient_accumulation_steps", "--gradient-accumulation-steps",
           "micro-batches per optimizer step (under pipeline parallelism: each pipeline's micro-batches)",
           config="training.gradient_accumulation_steps", aliases=("--pp-microbatches",), commands=TRAINED,
           planner=True),
    _count("seq_len", "--seq-len", "tokens per sequence", config="data.block_size", commands=TRAINED),
    Knob("precision", "--precision", "number formats (the config's training.bf16 / fp16 as HF sets them)",
         config="requested_precision", commands=TRAINED, planner=True),
    Knob("activation_checkpointing", "--activation-checkpointing",
         "recompute in backward: none, selective (op-level SAC) or full (alone: full)",
         config="training.gradient_checkpointing", commands=TRAINED, optional="full",
         negation=("--no-activation-checkpointing", "none"), planner=True),
    Knob("method", "--method", "what is trained (plan without GPUs: full, lora and qlora side by side)",
         config="finetune.method", commands=TRAINED),
    _count("lora_r", "--lora-r", "LoRA rank", config="finetune.r", commands=TRAINED),
    Knob("lora_targets", "--lora-targets", "all-linear or a comma list (q_proj,v_proj)",
         config="finetune.target_modules", commands=TRAINED, parse=parse_list, metavar="LIST"),
    Knob("optimizer", "--optimizer", "HF name; its states and step() temporaries differ", config="training.optim",
         commands=TRAINED),
    Knob("attention", "--attention", "attention kernel", config="model.attn_implementation", commands=TRAINED),
    Knob("optimizer_in_backward", "--optimizer-in-backward", "step each weight as its gradient is ready (1 GPU)",
         config="training.optimizer_in_backward", commands=TRAINED, switch=True),
    Knob("loss_chunk_tokens", "--loss-chunk-tokens", "the loss's logits this many tokens at a time; 0: all at once",
         config="training.loss_chunk_tokens", commands=TRAINED, type=int),
    _count("tp", "--tp", "tensor (+ sequence) parallel ranks, within a node", config="parallel.tp", group="layout",
           planner=True),
    _count("pp", "--pp", "pipeline stages", config="parallel.pp", group="layout", planner=True),
    _count("cp", "--cp", "context parallel ranks (the sequence split)", config="parallel.cp", group="layout",
           planner=True),
    _count("ep", "--ep", "expert parallel ranks (MoE)", config="parallel.ep", group="layout", planner=True),
    _count("etp", "--etp", "the experts' tensor parallel beside --ep: 1 (whole experts) or --tp (split over it)",
           config="parallel.etp", group="layout", planner=True),
    Knob("pp_schedule", "--pp-schedule", "pipeline schedule", config="parallel.pp_schedule", group="layout"),
    _count("pp_virtual_stages", "--pp-virtual-stages", "model chunks per pipeline rank (interleaved 1F1B)",
           config="parallel.pp_virtual_stages", group="layout"),
    Knob("sequence_parallel", "--sequence-parallel", "with --tp: shard the norms' activations (--no-: replicate "
         "them, Megatron-LM without --sequence-parallel)", config="parallel.sequence_parallel", group="layout",
         negatable=True),
    _count("max_steps", "--max-steps", "stop after N optimizer steps", config="training.max_steps",
           commands=(RUN, SUBMIT), group="config", plans=False),
    _count("save_steps", "--save-steps", "checkpoint every N steps", config="training.save_steps",
           commands=(RUN, SUBMIT), group="config", plans=False),
    Knob("resume_from", "--resume-from", "resume from this checkpoint directory",
         config="training.resume_from_checkpoint", commands=(RUN,), group="config", plans=False, metavar="PATH"),
    Knob("overwrite", "--overwrite", "remove an earlier llaunch run in the output directory first (never any "
         "other directory)", config="training.overwrite_output_dir", commands=(RUN,), group="config",
         switch=True, plans=False),
    _count("spare_nodes", "--spare-nodes", "nodes allocated beyond --nodes: a job whose node hangs or fails goes on "
           "from its newest checkpoint with a spare in that node's place, in the same allocation (no requeue)",
           commands=(SUBMIT,), group="allocation", plans=False),
    _count("max_restarts", "--max-restarts", "restarts inside the allocation before the job requeues (with "
           "--spare-nodes: new steps on the healthy nodes; without: torchrun's restarts of the ranks)",
           commands=(SUBMIT,), group="allocation", plans=False),
    Knob("no_resume", "--no-resume", "start fresh even if DIR holds checkpoints", config="training.ignore_checkpoints",
         commands=(RUN,), group="config", switch=True, plans=False),
)
BY_FIELD = {knob.field: knob for knob in KNOBS}


def add_knob_flags(parser, command: str, titles: dict[str, str] | None = None) -> dict[str, Any]:
    """Add the flags of every knob `command` takes, in the table's groups (`titles` renames some for the
    command), and return the groups by name; each action is marked with its knob
    (the test that no command declares a knob by hand reads the mark). No default is given, so a parser with
    argument_default=SUPPRESS (`run`'s flags after CONFIG) leaves what was parsed before alone."""
    groups: dict[str, Any] = {}
    for knob in KNOBS:
        if command not in knob.commands:
            continue
        if knob.group not in groups:
            groups[knob.group] = parser.add_argument_group({**GROUPS, **(titles or {})}[knob.group])
        _add_flag(groups[knob.group], knob)
    return groups


def _add_flag(group, knob: Knob) -> None:
    flags = (knob.flag, *knob.aliases)
    if knob.switch:
        actions = [group.add_argument(*flags, dest=knob.field, action="store_true", help=knob.help_text())]
    elif knob.negatable:
        actions = [group.add_argument(*flags, dest=knob.field, action=argparse.BooleanOptionalAction,
                                      help=knob.help_text())]
    else:
        extra = {"nargs": "?", "const": knob.optional} if knob.optional is not None else {}
        actions = [group.add_argument(*flags, dest=knob.field, type=knob.type, choices=knob.choices,
                                      metavar=knob.value_name, help=knob.help_text(), **extra)]
    if knob.negation:
        flag, value = knob.negation
        actions.append(group.add_argument(flag, dest=knob.field, action="store_const", const=value,
                                          help=f"same as {knob.flag} {value}"))
    for action in actions:
        action.knob = knob


def knob_flags() -> dict[str, Knob]:
    """Every flag spelling a knob owns (aliases and --no- forms too) -> its knob."""
    spellings = {}
    for knob in KNOBS:
        names = [knob.flag, *knob.aliases, *([knob.negation[0]] if knob.negation else [])]
        if knob.negatable:
            names += ["--no-" + name[2:] for name in (knob.flag, *knob.aliases)]
        spellings.update(dict.fromkeys(names, knob))
    return spellings


def cli_knobs(args: argparse.Namespace) -> dict[str, Any]:
    """The planner knobs set on the command line, {PlanRequest field: value}, each parsed by its row's rule."""
    out: dict[str, Any] = {}
    for knob in KNOBS:
        value = getattr(args, knob.field, None)
        if not knob.plans or value is None or (knob.switch and value is False):
            continue
        value = knob.parse(value, knob.flag) if knob.parse else value
        out.update(value if isinstance(value, dict) else {knob.field: value})
    return out


def config_knobs(config) -> dict[str, Any]:
    """The planner knobs a train config sets (a None key is the planner's to choose, or the default's)."""
    out = {}
    for knob in KNOBS:
        value = _config_value(config, knob) if knob.plans and knob.config else None
        if value is not None:
            out[knob.field] = value
    return out


def _config_value(config, knob: Knob) -> Any:
    section, _, key = knob.config.rpartition(".")
    return getattr(getattr(config, section) if section else config, key)


def request_knobs(config, flags: dict[str, Any], notes: list[str], source: str) -> dict[str, Any]:
    """The one mapping to the planner's request: the config's knobs with `flags` (the command line's, and
    `submit`'s cluster profile's nodes) over them. A flag with a config key was written into the config
    already (config_overrides; load_train_config says what it replaced); one the config derives from other keys
    (precision, from training.bf16 / fp16) is said here, into `notes`."""
    knobs = config_knobs(config)
    for field, value in flags.items():
        if value is None:
            continue
        knob, before = BY_FIELD.get(field), knobs.get(field)
        if knob is not None and knob.config and not knob.has_yaml_key and before not in (None, value):
            notes.append(f"llaunch: {knob.flag} {value} overrides {before}, which {source} or its overrides ask for.")
        knobs[field] = value
    return knobs


def config_overrides(args: argparse.Namespace, without: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """(flag as typed, `key=value`) for each flag the user set that has a train-config key (but the fields
    `without`), so the job's config.yaml says what was forced; they win over the YAML and over positional
    overrides (launcher.config.load_train_config applies them last, and says so)."""
    out = []
    for knob in KNOBS:
        raw = getattr(args, knob.field, None)
        if raw is None or raw is False and knob.switch or not knob.has_yaml_key or knob.field in without:
            continue
        value = knob.parse(raw, knob.flag) if knob.plans and knob.parse else raw
        if isinstance(value, dict):  # the global batch: only a count of sequences has a config key
            value = value.get(knob.field)
        if value is not None:
            out.append((knob.flag + ("" if knob.switch else f" {raw}"), f"{knob.config}={json.dumps(value)}"))
    return out


def check_config_knobs(config) -> None:
    """A config's knob values by the same rule as the flags' (launcher.planning.plan.check_knob), named by key."""
    for field, value in config_knobs(config).items():
        knob = BY_FIELD[field]
        check_knob(field, recompute_mode(value) if field == "activation_checkpointing" else value, knob.config)
