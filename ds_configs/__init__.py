"""DeepSpeed JSON templates (zero1/2/3) whose "auto" fields are filled from the Plan and train config.

Templates ship in the wheel and are read with importlib.resources. Rendering is pure (no deepspeed import),
so `--dry-run` and tests can show the exact JSON a run will use. A user's `parallel.deepspeed` mapping is
merged over the rendered result, so any key they set is kept as written.
"""

from __future__ import annotations

import copy
import json
from importlib import resources

from launcher.errors import LaunchError


def load_template(strategy: str) -> dict:
    """The template for zero1, zero2 or zero3."""
    name = f"{strategy}.json"
    try:
        return json.loads(resources.files(__name__).joinpath(name).read_text())
    except FileNotFoundError:
        raise LaunchError(f"no DeepSpeed template for strategy {strategy!r}; use zero1, zero2 or zero3.") from None


def render_ds_config(plan, training, hidden_size: int, overrides: dict | None = None) -> dict:
    """Fill every "auto" with the planner's batch/precision/offload and the trainer's optimizer numbers."""
    config = load_template(plan.strategy)
    offload_optimizer = plan.offload in ("optimizer", "optimizer+params")
    auto = {
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "train_batch_size": plan.global_batch,
        "gradient_clipping": training.max_grad_norm,
        "bf16.enabled": plan.precision in ("amp-bf16", "bf16"),
        "fp16.enabled": plan.precision == "amp-fp16",
        # DeepSpeed builds its own (CPU) Adam only when the optimizer lives off the GPU; else we pass torch's.
        "optimizer": {"type": "AdamW", "params": {
            "lr": training.learning_rate, "betas": [training.adam_beta1, training.adam_beta2],
            "eps": training.adam_epsilon, "weight_decay": training.weight_decay}} if offload_optimizer else None,
        # Bucket sizes as HF's integration derives them from the hidden size.
        "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
        "zero_optimization.allgather_bucket_size": hidden_size * hidden_size,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
        "zero_optimization.offload_optimizer.device": "cpu" if offload_optimizer else "none",
        "zero_optimization.offload_param.device": "cpu" if plan.offload == "optimizer+params" else "none",
    }
    _fill(config, auto, "")
    return _merge(config, overrides or {})


def _fill(node: dict, auto: dict, prefix: str) -> None:
    for key in list(node):
        path = f"{prefix}{key}"
        if isinstance(node[key], dict):
            _fill(node[key], auto, path + ".")
        elif node[key] == "auto":
            if path not in auto:
                raise LaunchError(f"DeepSpeed template key {path} is 'auto' but llaunch has no value for it.")
            if auto[path] is None:
                del node[key]
            else:
                node[key] = auto[path]


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
