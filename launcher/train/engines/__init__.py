"""Engines: thin adapters (DDP, FSDP2, DeepSpeed ZeRO) behind the one protocol in base.py."""

from __future__ import annotations

from launcher.train.engines.base import Engine


def build_engine(model, plan, training, device, deepspeed_overrides: dict) -> Engine:
    """The engine the plan's strategy names; imports only that engine's library."""
    if plan.strategy == "ddp":
        from launcher.train.engines.ddp import DDPEngine

        return DDPEngine(model, plan, training, device)
    if plan.strategy == "fsdp":
        from launcher.train.engines.fsdp import FSDPEngine

        return FSDPEngine(model, plan, training, device)
    from launcher.train.engines.deepspeed import DeepSpeedEngine

    return DeepSpeedEngine(model, plan, training, device, deepspeed_overrides)
