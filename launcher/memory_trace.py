"""`llaunch plan --trace`: the peak of a real training step, traced by PyTorch's MemTracker on fake tensors.

The model is built truncated (1 and 2 decoder layers) under FakeTensorMode, so nothing is allocated; two
steps of forward + backward + AdamW run under torch.distributed._tools MemTracker, and the peak is scaled
linearly by depth (every decoder layer adds the same saved tensors, gradients and states). The trace runs
the CPU kernels, so it checks the analytic estimator's terms rather than CUDA's allocator.
"""

from __future__ import annotations

from dataclasses import dataclass

from launcher.memory import TrainSetup
from launcher.models import ModelSpec

TRACE_DEPTHS = (1, 2)


@dataclass
class TraceResult:
    peak_bytes: int  # scaled to the full depth
    by_depth: dict[int, int]


def trace_peak(spec: ModelSpec, setup: TrainSetup, depths: tuple[int, ...] = TRACE_DEPTHS) -> TraceResult:
    by_depth = {d: traced_step_peak(spec, setup, d) for d in depths}
    (d1, p1), (d2, p2) = sorted(by_depth.items())[:2]
    per_layer = (p2 - p1) / (d2 - d1)
    return TraceResult(peak_bytes=int(p1 + (spec.layers - d1) * per_layer), by_depth=by_depth)


def traced_step_peak(spec: ModelSpec, setup: TrainSetup, layers: int) -> int:
    """Peak bytes of two training steps of `spec` cut to `layers` decoder layers, on fake tensors."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import AutoConfig, AutoModelForCausalLM

    from launcher.errors import LaunchError
    from launcher.models import LLAMA_LIKE
    from launcher.train.modeling import enable_activation_checkpointing

    if setup.method != "full":  # PEFT moves adapters with Module.to(), which cannot swap fake parameters
        raise LaunchError("--trace supports full fine-tuning only (PEFT cannot wrap a fake-tensor model); drop --trace.")

    depth_key = "num_hidden_layers" if spec.model_type in LLAMA_LIKE or "num_hidden_layers" in spec.hf_config else "n_layer"
    config = AutoConfig.for_model(**{**spec.hf_config, depth_key: layers})
    dtype = torch.bfloat16 if setup.precision == "bf16" else torch.float32  # set at build: fake params cannot .to()
    with FakeTensorMode():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        model.config.use_cache = False
        if setup.activation_checkpointing:
            enable_activation_checkpointing(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        tokens = torch.randint(0, spec.vocab, (setup.micro_batch, setup.seq_len))
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
        peak = 0
        with tracker:
            for _ in range(2):  # the second step has optimizer states: the steady state
                tracker.reset_mod_stats()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setup.precision.startswith("amp")):
                    loss = model(input_ids=tokens, labels=tokens).loss
                loss.backward()
                peak = max(peak, _root_peak(tracker, model))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return max(peak, *(snap["Total"] for snap in tracker.get_tracker_snapshot("peak").values()))


def _root_peak(tracker, model) -> int:
    stats = tracker.memory_tracking.get(model)
    if stats is None:
        return 0
    return max((dev["Total"] for snaps in stats.snapshots.values() for snap in snaps for dev in snap.values()), default=0)
