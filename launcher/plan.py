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

STRATEGIES = ("ddp", "fsdp", "zero1", "zero2", "zero3")
OFFLOADS = ("none", "optimizer", "optimizer+params")
METHODS = ("full", "lora", "qlora")
PRECISIONS = ("fp32", "amp-bf16", "amp-fp16", "bf16")
OPTIMIZERS = ("adamw", "adamw-8bit", "sgd")
ATTENTIONS = ("sdpa", "eager", "flash")
DEVICES = ("cuda", "cpu")


@dataclass
class Plan:
    """One chosen (or forced) way to run a job; `memory` and `predicted` are the planner's figures."""

    model: str
    params: int = 0
    strategy: str = "ddp"
    offload: str = "none"
    method: str = "full"
    precision: str = "amp-bf16"
    optimizer: str = "adamw"
    attention: str = "sdpa"
    activation_checkpointing: bool = False
    lora_r: int = 16
    lora_targets: list[str] = field(default_factory=lambda: ["all-linear"])
    micro_batch: int = 1
    gradient_accumulation_steps: int = 1
    seq_len: int = 2048
    nodes: int = 1
    gpus_per_node: int = 1
    device: str = "cuda"
    gpu_name: str = ""
    gpu_mem_bytes: int = 0
    memory: dict[str, int] = field(default_factory=dict)
    predicted: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step across all ranks."""
        return self.micro_batch * self.gradient_accumulation_steps * self.world_size

    @property
    def global_batch_tokens(self) -> int:
        return self.global_batch * self.seq_len

    def validate(self) -> "Plan":
        for name, allowed in (
            ("strategy", STRATEGIES),
            ("offload", OFFLOADS),
            ("method", METHODS),
            ("precision", PRECISIONS),
            ("optimizer", OPTIMIZERS),
            ("attention", ATTENTIONS),
            ("device", DEVICES),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise LaunchError(f"plan {name} {value!r} is not one of {', '.join(allowed)}.")
        for name in ("micro_batch", "gradient_accumulation_steps", "seq_len", "nodes", "gpus_per_node"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LaunchError(f"plan {name} must be a positive integer, not {value!r}.")
        if self.offload != "none" and not self.strategy.startswith("zero"):
            raise LaunchError(
                f"offload {self.offload!r} needs a DeepSpeed ZeRO strategy; use --strategy zero2 or zero3."
            )
        if self.offload == "optimizer+params" and self.strategy != "zero3":
            raise LaunchError("parameter offload needs ZeRO-3; use --strategy zero3 or --offload optimizer.")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        if not isinstance(data, dict):
            raise LaunchError("a plan must be a YAML mapping; write one with `llaunch plan -o plan.yaml`.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LaunchError(f"plan has unknown key(s) {', '.join(unknown)}; regenerate it with `llaunch plan`.")
        if "model" not in data:
            raise LaunchError("plan names no model; regenerate it with `llaunch plan`.")
        return cls(**data).validate()

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
