"""The planner's request: what the user asked for, each knob forced or left to the planner."""

from __future__ import annotations

from dataclasses import dataclass, field

from launcher.errors import LaunchError
from launcher.knobs import BY_FIELD
from launcher.planning.plan import KNOBS, TrainSetup, check_count, check_knob, recompute_mode


@dataclass
class PlanRequest:
    """What the user asked for: every TrainSetup knob as an optional override (None: the planner chooses it, or
    the probe says, or TrainSetup's default holds), plus what only a request has. Commands fill it from the
    knob table (launcher.knobs), which names each field's flag and config key."""

    model: str = "1b"
    model_overrides: dict = field(default_factory=dict)
    gpu: str | None = None
    gpu_mem_bytes: int | None = None
    global_batch: int | None = None
    global_batch_tokens: int | None = None
    # Planning for `llaunch run` / `submit`: only what the ranks' engines run (pure data parallel, no selective
    # recompute); `llaunch plan` itself weighs every layout.
    runnable_only: bool = False
    # TrainSetup's knobs, each optional (a test keeps the two lists and the knob table the same).
    strategy: str | None = None
    offload: str | None = None
    method: str | None = None
    precision: str | None = None
    optimizer: str | None = None
    attention: str | None = None
    activation_checkpointing: str | None = None
    lora_r: int | None = None
    lora_targets: list[str] | None = None
    micro_batch: int | None = None
    gradient_accumulation_steps: int | None = None
    seq_len: int | None = None
    nodes: int | None = None
    gpus_per_node: int | None = None
    device: str | None = None
    loss_chunk_tokens: int | None = None
    optimizer_in_backward: bool | None = None
    tp: int | None = None
    pp: int | None = None
    cp: int | None = None
    ep: int | None = None
    etp: int | None = None
    pp_schedule: str | None = None
    pp_virtual_stages: int | None = None
    sequence_parallel: bool | None = None

    def validate(self) -> "PlanRequest":
        """Each knob by its one rule (plan.check_knob), named by its flag in the knob table."""
        if self.activation_checkpointing is not None:
            self.activation_checkpointing = recompute_mode(self.activation_checkpointing)
        for name, value in self.forced().items():
            check_knob(name, value, BY_FIELD[name].flag)
        for name in ("global_batch", "global_batch_tokens"):
            value = getattr(self, name)
            if value is not None:
                check_count(value, "--" + name.replace("_", "-"))
        if self.gpu_mem_bytes is not None and self.gpu_mem_bytes <= 0:
            raise LaunchError("--gpu-mem must be positive.")
        return self

    def forced(self) -> dict:
        """The knobs the user set: {TrainSetup field: value}."""
        return {name: getattr(self, name) for name in KNOBS if getattr(self, name) is not None}

    def fixed(self) -> TrainSetup:
        """The knobs as forced and TrainSetup's defaults for the rest. Of those, the planner then chooses
        strategy, offload, precision, checkpointing, micro-batch and accumulation when they are not forced, and
        the hardware gives nodes, GPUs per node and device."""
        return TrainSetup(**self.forced())
