"""The Plan: the contract between planning (`llaunch plan`) and launching (`run`, `submit`, the ranks).

Everything a rank needs to know about parallelism, batch and precision is here; no rank re-plans.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from launcher.errors import LaunchError
from launcher.files import write_text_atomic
from launcher.planning.parallel import CP_REFUSAL, PP_SCHEDULES, RECOMPUTES, ParallelDims, check_layout, layout_of

STRATEGIES = ("ddp", "fsdp", "hsdp", "zero1", "zero2", "zero3")  # hsdp: FSDP2 sharded in a node, replicated across nodes
STRATEGY_ORDER = {s: i for i, s in enumerate(STRATEGIES)}  # simpler first when the planner's times tie
FSDP_STRATEGIES = ("fsdp", "hsdp")  # run by the FSDP2 engine
DEEPSPEED_STRATEGIES = ("zero1", "zero2", "zero3")  # run by the DeepSpeed engine at that ZeRO stage
OFFLOADS = ("none", "optimizer", "optimizer+params")
METHODS = ("full", "lora", "qlora")  # what `llaunch plan` and the sizing table put side by side
PREFIX = "prefix"  # prefix tuning: planned with a full fine-tune's memory and time, an upper bound
LORA_METHODS = ("lora", "qlora")  # a frozen base (4-bit for QLoRA) and trained low-rank adapters
# fp8: torchao float8 training (Float8Linear, dynamic scaling): weights, masters and saved activations as
# amp-bf16, the linears' matmuls on fp8 casts (launcher/train/float8.py; torch._scaled_mm runs on CPU too)
PRECISIONS = ("fp32", "amp-bf16", "amp-fp16", "bf16", "fp8")
OPTIMIZERS = ("adamw_torch_fused", "adamw_torch", "adamw_bnb_8bit", "paged_adamw_8bit", "sgd", "adafactor")  # HF names
ATTENTIONS = ("sdpa", "eager", "flash")
DEVICES = ("cuda", "cpu")
LOSS_CHUNK_TOKENS = 512  # tokens per chunk of the causal-LM loss (launcher/train/chunked_loss.py); 0: full logits
PIPELINED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # decoders cut into stages (launcher/train/pipeline.py)
LORA_R = 16  # the LoRA rank when none is given: finetune.r, the planner and the Plan share it (alpha defaults to 2r)


@dataclass(frozen=True)
class EngineSupport:
    """What the engine that runs a strategy can do. The engines (launcher/train/engines/) are built to these
    declarations; launcher.jobdir.prepare refuses a config that asks for more, and the estimator and planner count only
    what the engine does. It lives here, torch-free, because the launcher side reads it."""

    clip_grad_value: bool  # training.max_grad_value: DeepSpeed clips only by norm
    compile: bool  # training.torch_compile of the decoder layers
    quantized_base: bool  # QLoRA's 4-bit base (bf16 quant storage: FSDP2 and ZeRO-3 shard it like any weight)
    chunked_loss: bool  # the loss inside the model's forward can read the LM head's weight whole
    offloads: tuple[str, ...] = ("none",)  # what it can keep in host memory (OFFLOADS)
    # Each parameter's optimizer step runs as its gradient is ready (torchtune's optimizer_in_bwd), in a single
    # unwrapped process: no gradient all-reduce or shard to wait for.
    optimizer_in_backward: bool = False
    # The model-parallel dimensions its ranks run (tp, pp, cp, ep); `llaunch run` and `submit` refuse a layout
    # that `llaunch plan` may recommend at scale and the engine does not declare.
    layouts: tuple[str, ...] = ()
    recomputes: tuple[str, ...] = ("none", "full")  # RECOMPUTES it runs (selective: launcher/train/recompute.py)
    float8: bool = False  # precision fp8: torchao's Float8Linear swapped in before wrapping (launcher/train/float8.py)


# Pipeline stages (launcher/train/engines/pipeline.py) run under DDP and FSDP2 / HSDP on the data-parallel ranks.
_TORCH = EngineSupport(clip_grad_value=True, compile=True, quantized_base=True, chunked_loss=True,
                       layouts=("pp",), float8=True, recomputes=RECOMPUTES)
_DDP = dataclasses.replace(_TORCH, optimizer_in_backward=True)  # a world of one is never wrapped in DDP
# FSDP2's CPUOffloadPolicy keeps the sharded parameters, their gradients and the optimizer states on the
# CPU and steps there: parameters and optimizer go together ("optimizer+params"), never the optimizer alone.
# Tensor (+ sequence) parallel DTensors compose with FSDP2 on the (dp_shard, tp) mesh (launcher/train/tensor_parallel.py);
# DDP and ZeRO do not take DTensor weights (torchtitan refuses DDP beyond one mesh dimension too). Expert
# parallelism borrows its ranks from FSDP's shards (ParallelDims): launcher/train/expert_parallel.py.
_FSDP = dataclasses.replace(_TORCH, offloads=("none", "optimizer+params"), layouts=("ep", "pp", "tp"))
_ZERO = EngineSupport(clip_grad_value=False, compile=False, quantized_base=False, chunked_loss=True,
                      offloads=("none", "optimizer"))
ENGINE_SUPPORT = {
    "ddp": _DDP, "fsdp": _FSDP, "hsdp": _FSDP, "zero1": _ZERO, "zero2": _ZERO,
    # ZeRO-3 gathers a weight only inside its own module's forward; a loss that reads the LM head's weight
    # from outside (and again in backward) would see an empty partition, so it keeps the model's full logits.
    # ZeRO-1/2 are not offered a 4-bit base: their engine was never run with one here (ZeRO-3 was, on 2 ranks).
    "zero3": dataclasses.replace(_ZERO, chunked_loss=False, offloads=OFFLOADS, quantized_base=True),
}


# The mixtures of experts whose experts the ranks split over ep (launcher/train/expert_parallel.py): fused
# experts computing down(act(gate) * up), gate and up concatenated in one weight, no biases (DeepSeek-V3's shared
# experts and dense layers beside them stay data-parallel). gpt-oss's interleaved, biased, clamped experts are not
# among them yet.
EP_MODEL_TYPES = ("mixtral", "qwen3_moe", "deepseek_v3")


class StrategyTraits:
    """What a strategy, method and offload imply, asked of a Plan or a TrainSetup alike: one home for
    each answer instead of string tests where it is needed."""

    strategy: str
    method: str
    offload: str
    precision: str

    @property
    def is_deepspeed(self) -> bool:
        return self.strategy in DEEPSPEED_STRATEGIES

    @property
    def is_ddp(self) -> bool:
        """DDP's replicas: every rank holds every weight, gradient and optimizer state."""
        return self.strategy == "ddp"

    @property
    def is_hsdp(self) -> bool:
        """FSDP2 on a (nodes, GPUs per node) mesh: sharded within a node, replicated across nodes."""
        return self.strategy == "hsdp"

    @property
    def grads_whole(self) -> bool:
        """Each rank keeps whole gradients until the optimizer step (DDP, ZeRO-1): one all-reduce per step."""
        return self.is_ddp or self.zero_stage == 1

    @property
    def zero_stage(self) -> int:
        """DeepSpeed's ZeRO stage; 0 for the torch engines."""
        return int(self.strategy[len("zero"):]) if self.is_deepspeed else 0

    @property
    def is_fsdp(self) -> bool:
        """Run by the FSDP2 engine (FSDP, and HSDP on its 2-D mesh)."""
        return self.strategy in FSDP_STRATEGIES

    @property
    def shards_params(self) -> bool:
        """Each rank holds a shard of the weights (ZeRO-3, FSDP, HSDP), gathered layer by layer."""
        return self.is_fsdp or self.zero_stage == 3

    @property
    def trains_adapters(self) -> bool:
        """LoRA or QLoRA: a frozen base and trained low-rank adapters."""
        return self.method in LORA_METHODS

    @property
    def offloads(self) -> bool:
        return self.offload != "none"

    @property
    def recomputes(self) -> bool:
        """Some activations are recomputed in backward (selective: attention's core; full: every layer)."""
        return self.activation_checkpointing != "none"

    @property
    def full_recompute(self) -> bool:
        """Every layer keeps only its input and runs its forward again in backward (what the ranks run today)."""
        return self.activation_checkpointing == "full"

    @property
    def flops_key(self) -> str:
        """The GPU peak (launcher/planning/data/gpus.json) the matmuls run at and MFU divides by: fp32 runs as TF32,
        amp-fp16 as fp16; fp8's MFU is Llama 3's "BF16 MFU" (its linears' share runs at the fp8 peak: step_time)."""
        return {"fp32": "tf32", "amp-fp16": "fp16"}.get(self.precision, "bf16")

    @property
    def mixed_precision(self) -> bool:
        """fp32 weights with bf16 / fp16 compute (autocast, or the sharding engines' mixed precision); fp8 too."""
        return self.precision.startswith("amp") or self.precision == "fp8"


CHOICES = {"strategy": STRATEGIES, "offload": OFFLOADS, "method": (*METHODS, PREFIX), "precision": PRECISIONS,
           "optimizer": OPTIMIZERS, "attention": ATTENTIONS, "device": DEVICES, "activation_checkpointing": RECOMPUTES,
           "pp_schedule": PP_SCHEDULES}
COUNTS = ("micro_batch", "gradient_accumulation_steps", "seq_len", "nodes", "gpus_per_node", "lora_r",
          "tp", "pp", "cp", "ep", "etp", "pp_virtual_stages")
# the parallelism record's own knobs
LAYOUT_KNOBS = ("tp", "pp", "cp", "ep", "etp", "pp_schedule", "pp_virtual_stages", "sequence_parallel")


def recompute_mode(value):
    """Activation checkpointing as a mode: a config's or an older plan's true / false mean full / none."""
    return {True: "full", False: "none"}.get(value, value) if isinstance(value, bool) else value


def check_count(value, label: str) -> None:
    """A count (of sequences, GPUs, steps) is a positive integer."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise LaunchError(f"{label} must be a positive integer, not {value!r}.")


def check_knob(name: str, value, label: str) -> None:
    """The one rule for a knob's values, wherever it was written; `label` names it as the user wrote it."""
    if name in CHOICES and value not in CHOICES[name]:
        raise LaunchError(f"{label} {value!r} is not one of {', '.join(CHOICES[name])}.")
    if name in COUNTS:
        check_count(value, label)
    if name == "loss_chunk_tokens" and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise LaunchError(f"{label} must be 0 (full logits) or a positive integer, not {value!r}.")


@dataclass
class TrainSetup(StrategyTraits):
    """The training knobs: what changes memory and speed (launcher/planning/memory.py and step_time.py estimate from
    them) and what the ranks run. The Plan is one of these plus the hardware, the estimates and the reasons;
    the planner's request holds the same fields as optional overrides."""

    strategy: str = "ddp"
    offload: str = "none"
    method: str = "full"
    precision: str = "amp-bf16"
    optimizer: str = "adamw_torch_fused"
    attention: str = "sdpa"
    activation_checkpointing: str = "none"  # RECOMPUTES; true / false (older plans, configs) mean full / none
    lora_r: int = LORA_R
    lora_targets: list[str] = field(default_factory=lambda: ["all-linear"])
    micro_batch: int = 1
    gradient_accumulation_steps: int = 1
    seq_len: int = 2048
    nodes: int = 1
    gpus_per_node: int = 1  # processes per node on CPU
    device: str = "cuda"
    loss_chunk_tokens: int = LOSS_CHUNK_TOKENS
    optimizer_in_backward: bool = False
    tp: int = 1  # tensor (and sequence) parallel ranks, inside a node
    pp: int = 1  # pipeline stages' ranks
    cp: int = 1  # context parallel: the sequence split over this many ranks
    ep: int = 1  # expert parallel (MoE)
    etp: int = 1  # the routed experts' tensor parallel: 1 or tp (ParallelDims.etp)
    pp_schedule: str = "1f1b"
    pp_virtual_stages: int = 1
    sequence_parallel: bool = True  # with tp > 1 (ParallelDims.sequence_parallel)

    def __post_init__(self):
        self.activation_checkpointing = recompute_mode(self.activation_checkpointing)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def parallel(self) -> ParallelDims:
        """The parallelism record (launcher.planning.parallel.layout_of)."""
        return layout_of(self.world_size, self.gpus_per_node, self.shards_params, self.is_hsdp, self.tp, self.pp,
                         self.cp, self.ep, self.etp, self.pp_schedule, self.gradient_accumulation_steps,
                         self.pp_virtual_stages, self.sequence_parallel)

    @property
    def device_mesh(self) -> tuple[int, ...]:
        """The FSDP2 mesh: HSDP's (replicate, shard) = (nodes, GPUs per node); plain FSDP shards over the world."""
        return (self.nodes, self.gpus_per_node) if self.is_hsdp else (self.world_size,)

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step: each data-parallel rank's micro-batches (tp / pp / cp ranks share theirs)."""
        return self.micro_batch * self.gradient_accumulation_steps * self.parallel.dp

    @property
    def global_batch_tokens(self) -> int:
        return self.global_batch * self.seq_len

    def knobs(self) -> "TrainSetup":
        """Only the knobs (of a Plan, say), for the estimators to vary with dataclasses.replace."""
        return TrainSetup(**{name: getattr(self, name) for name in KNOBS})

    def validate(self, label: str = "plan") -> "TrainSetup":
        for name in KNOBS:
            check_knob(name, getattr(self, name), f"{label} {name}")
        check_layout(self.parallel, self.world_size, self.gpus_per_node, cross_node=True)
        support = ENGINE_SUPPORT[self.strategy]
        if self.optimizer_in_backward and not (support.optimizer_in_backward and self.world_size == 1
                                               and self.gradient_accumulation_steps == 1
                                               and self.precision != "amp-fp16"):
            raise LaunchError("optimizer_in_backward steps each weight as its gradient is ready, so it runs in one "
                              "process without gradient accumulation or fp16 loss scaling; use 1 GPU, --strategy "
                              "ddp, accumulation 1 and bf16 or fp32.")
        if self.method == "qlora" and not support.quantized_base:
            able = ", ".join(s for s, can in ENGINE_SUPPORT.items() if can.quantized_base)
            raise LaunchError(f"QLoRA's 4-bit base runs under {able}, not {self.strategy}; choose one of them, "
                              f"or use finetune.method lora with {self.strategy}.")
        check_offload(self.strategy, self.offload)
        return self


def check_offload(strategy: str, offload: str) -> None:
    """The one rule for what a strategy can keep in host memory (ENGINE_SUPPORT), naming the ones that can."""
    if offload not in ENGINE_SUPPORT[strategy].offloads:
        able = ", ".join(f"{s} ({'/'.join(o for o in can.offloads if o != 'none')})"
                         for s, can in ENGINE_SUPPORT.items() if len(can.offloads) > 1)
        raise LaunchError(f"offload {offload!r} is not something {strategy} can do; offloading strategies: {able}.")


KNOBS = tuple(f.name for f in dataclasses.fields(TrainSetup))  # the one list of knob names


def unrunnable_dims(strategy: str, dims: ParallelDims) -> list[str]:
    """The model-parallel dimensions of `dims` that the strategy's engine does not run (ENGINE_SUPPORT)."""
    used = (("tp", dims.tp_enabled), ("pp", dims.pp_enabled), ("cp", dims.cp_enabled), ("ep", dims.ep_enabled))
    return [name for name, on in used if on and name not in ENGINE_SUPPORT[strategy].layouts]


def can_run(strategy: str, dims: ParallelDims) -> bool:
    return not unrunnable_dims(strategy, dims)


def check_runnable(setup: TrainSetup) -> None:
    """What `llaunch run` and `submit` refuse before any process starts: a layout or recompute mode the
    strategy's engine does not declare (ENGINE_SUPPORT), and what pipeline stages do not run."""
    support, dims = ENGINE_SUPPORT[setup.strategy], setup.parallel
    beside_ep = [name for name, on in (("tp", dims.tp_enabled), ("pp", dims.pp_enabled)) if on]
    if dims.ep_enabled and beside_ep:  # the experts' split of dp_shard is not composed with tp (etp) or pp stages
        whole = f" and hold whole experts, not split over --etp {dims.etp}" if dims.etp_enabled else ""
        raise LaunchError(f"the ranks run expert parallelism without {' or '.join(beside_ep)} so far{whole}; keep "
                          f"--ep 1 or --{' / --'.join(beside_ep)} 1.")
    if dims.cp_enabled:
        raise LaunchError(CP_REFUSAL)
    used = unrunnable_dims(setup.strategy, dims)
    if used:
        able = [s for s, can in ENGINE_SUPPORT.items() if set(used) <= set(can.layouts)]
        instead = f"use --strategy {' or '.join(able)}, or drop" if able else "plan without"
        raise LaunchError(f"this plan's layout {dims.label()} uses {' and '.join(used)}, which the {setup.strategy} "
                          f"engine cannot run; {instead} --{' / --'.join(used)} to train it with llaunch.")
    if dims.pp_enabled and (setup.trains_adapters or setup.offloads or setup.precision == "amp-fp16"):
        raise LaunchError("pipeline stages train full weights in fp32, bf16 or amp-bf16, without offloading; use "
                          "--pp 1 for LoRA / QLoRA, offloading or amp-fp16.")
    if dims.tp_enabled and setup.method != "full":
        raise LaunchError(f"tensor parallelism splits full weights; {setup.method} wraps them in PEFT modules the "
                          f"tp plan does not split, so train it with --tp 1.")
    # fp8: a full model's linears become torchao Float8Linear under DDP / FSDP2, never inside tp / pp / ep
    if setup.precision == "fp8" and (not support.float8 or setup.method != "full" or not dims.pure_data_parallel):
        able = [s for s, can in ENGINE_SUPPORT.items() if can.float8]
        raise LaunchError(f"fp8 (torchao float8) trains full weights under --strategy {' / '.join(able)} without "
                          f"tp, pp or ep; use one of those with --tp 1 --pp 1 --ep 1, or --precision amp-bf16.")
    if setup.activation_checkpointing not in support.recomputes:
        raise LaunchError(f"{setup.activation_checkpointing} activation checkpointing is not something the "
                          f"{setup.strategy} engine runs; use {' or '.join(support.recomputes)}.")


@dataclass(kw_only=True)
class Plan(TrainSetup):
    """One chosen (or forced) way to run a job: its knobs, the hardware they were planned for, and the
    planner's figures (`memory`, `predicted`) and reasons."""

    model: str
    params: int = 0
    active_params: int = 0  # what one token uses: a mixture of experts' top-k experts, else params
    gpu_name: str = ""
    gpu_mem_bytes: int = 0
    memory: dict[str, int] = field(default_factory=dict)
    predicted: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    def on_nodes(self, nodes: int) -> "Plan":
        """This plan on `nodes` nodes with the same global batch: accumulation grows as nodes drop (--min-nodes)."""
        per_step = self.micro_batch * nodes * self.gpus_per_node // self.parallel.model_parallel
        if self.global_batch % per_step:
            raise LaunchError(f"the global batch of {self.global_batch} does not split into micro-batches of "
                              f"{self.micro_batch} over {nodes} node(s); choose --min-nodes so that every node count "
                              f"from it to --nodes divides it.")
        return dataclasses.replace(self, nodes=nodes, gradient_accumulation_steps=self.global_batch // per_step)

    def to_dict(self) -> dict:
        """The model first, then the knobs with the parallelism record as one mapping, the hardware and the figures."""
        data = {"model": self.model, "params": self.params, "active_params": self.active_params,
                **dataclasses.asdict(self)}
        for name in LAYOUT_KNOBS:
            data.pop(name)
        return {**data, "parallel": self.parallel.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        if not isinstance(data, dict):
            raise LaunchError("a plan must be a YAML mapping; write one with `llaunch plan -o FILE`.")
        known = {f.name for f in dataclasses.fields(cls)} | {"parallel"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LaunchError(f"plan has unknown key(s) {', '.join(unknown)}; regenerate it with `llaunch plan`.")
        if "model" not in data:
            raise LaunchError("plan names no model; regenerate it with `llaunch plan`.")
        return cls._with_layout(data)

    @classmethod
    def _with_layout(cls, data: dict) -> "Plan":
        """A plan from its mapping; one written before the parallelism record is pure data parallel."""
        data = dict(data)
        layout = data.pop("parallel", None) or {}
        if not isinstance(layout, dict) or set(layout) - set(ParallelDims.__dataclass_fields__):
            raise LaunchError("plan's parallel mapping has unknown keys; regenerate it with `llaunch plan`.")
        plan = cls(**data, **{k: v for k, v in layout.items() if k in LAYOUT_KNOBS}).validate()
        stored = {k: v for k, v in layout.items() if k not in LAYOUT_KNOBS}
        derived = plan.parallel.to_dict()
        if any(derived[k] != v for k, v in stored.items()):
            raise LaunchError(f"plan's parallel mapping {stored} does not match its strategy {plan.strategy} on "
                              f"{plan.world_size} GPUs ({plan.parallel.label()}); regenerate it with `llaunch plan`.")
        return plan

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, self.to_yaml())

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise LaunchError(f"plan file {path} does not exist; write one with `llaunch plan -o {path}`.") from None
        except yaml.YAMLError as err:
            raise LaunchError(f"plan file {path} is not valid YAML ({err.__class__.__name__}); regenerate it.") from None
        return cls.from_dict(data)
