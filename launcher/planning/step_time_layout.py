"""Seconds a layout's model-parallel dimensions add to a step: tensor-parallel collectives, the pipeline's bubble
and point-to-point sends, context parallel's ring exchange. launcher.planning.step_time adds them to compute and the
data-parallel collectives.

Sources: Korthikanti et al. 2022 (sec. 4.2.2: with sequence parallel each layer runs 2 all-gathers and 2
reduce-scatters of the s x b x h activations in forward and as many in backward, the same volume as the 2 + 2
all-reduces without it); Narayanan et al. 2021 (sec. 2.2: the pipeline bubble is (p - 1) / m of the ideal time
under GPipe and 1F1B, (p - 1) / (m v) with v interleaved chunks per rank); Liu et al. 2023, "Ring Attention"
(cp - 1 exchanges of each rank's K, V chunk per layer, overlapped with the attention of the chunk in hand).
"""

from __future__ import annotations

from launcher.planning.memory_layout import local_tokens
from launcher.planning.memory_sizes import compute_mode
from launcher.planning.models import ModelSpec
from launcher.planning.plan import TrainSetup

LINK_EFFICIENCY = 0.8  # NCCL bus bandwidth / link bandwidth for large messages (launcher.planning.step_time's figure)


def _activation_bytes(setup: TrainSetup) -> int:
    return compute_mode(setup).act_bytes


def nvlink_bytes_per_s(hw, facts) -> float:
    """The node's GPU-to-GPU link: NVLink, or PCIe where the GPU has none (L40S); a cluster profile's own figure."""
    return hw.node_link_bytes_per_s(facts) * LINK_EFFICIENCY


# A layer's tp collectives that run again in backward: the whole second forward's under full recompute; under
# selective sequence parallel's two all-gathers, whose outputs it does not keep (without sequence parallel only
# o_proj's all-reduce runs again: 2 is an upper bound there).
RECOMPUTED_COLLECTIVES = {"none": 0, "selective": 2, "full": 4}


def tensor_parallel_seconds(spec: ModelSpec, setup: TrainSetup, hw, facts) -> float:
    """Per step: 4 collectives of a layer's activations in forward, 4 in backward, those recompute runs again
    (RECOMPUTED_COLLECTIVES), each moving (t - 1) / t of them, on NVLink (or the network where tp was forced across nodes).
    Counted exposed: without async TP (torch.compile's micro-pipelining) they sit between the matmuls. A mixture
    of experts' block gathers its input and reduce-scatters its output over tp under either etp (torchtitan's
    PrepareModuleInputOutput on it), so etp changes the all-to-all (expert_parallel.all_to_all_seconds), not these."""
    dims = setup.parallel
    if not dims.tp_enabled:
        return 0.0
    size = local_tokens(setup) * spec.hidden * _activation_bytes(setup)
    per_layer = 8 + RECOMPUTED_COLLECTIVES[setup.activation_checkpointing]
    layers = spec.layers / dims.pp
    volume = layers * dims.pp_microbatches * per_layer * size * (dims.tp - 1) / dims.tp
    link = nvlink_bytes_per_s(hw, facts)
    if dims.tp > hw.gpus_per_node:
        link = min(link, hw.network_bytes_per_s * LINK_EFFICIENCY)
    return volume / link


def bubble_fraction(setup: TrainSetup) -> float:
    """The pipeline's idle share of the ideal step: (p - 1) / (m v) (Narayanan et al. 2021, sec. 2.2)."""
    dims = setup.parallel
    if not dims.pp_enabled:
        return 0.0
    return (dims.pp - 1) / (dims.pp_microbatches * dims.pp_virtual_stages)


def pipeline_p2p_seconds(spec: ModelSpec, setup: TrainSetup, hw, facts) -> float:
    """Each microbatch's hidden states forward and their gradient back across each of a rank's v stage
    boundaries (sequence-parallel: 1/t of them per tp rank), over the network when stages span nodes."""
    dims = setup.parallel
    if not dims.pp_enabled:
        return 0.0
    size = local_tokens(setup) * spec.hidden * _activation_bytes(setup) / (dims.tp if dims.sequence_parallel else 1)
    volume = 2 * dims.pp_virtual_stages * dims.pp_microbatches * size
    across = setup.world_size > hw.gpus_per_node
    link = hw.network_bytes_per_s * LINK_EFFICIENCY if across else nvlink_bytes_per_s(hw, facts)
    return volume / link


def context_parallel_seconds(spec: ModelSpec, setup: TrainSetup, hw, facts, attention_s: float) -> float:
    """Ring attention's exposed exchange: per layer cp - 1 passes of the K, V chunk in forward, K, V and their
    gradients in backward (3 x), less the attention compute they overlap with."""
    dims = setup.parallel
    if not dims.cp_enabled:
        return 0.0
    chunk = 2 * local_tokens(setup) * spec.kv_heads * spec.head_dim * _activation_bytes(setup)
    volume = spec.layers / dims.pp * dims.pp_microbatches * 3 * (dims.cp - 1) * chunk
    link = nvlink_bytes_per_s(hw, facts)
    if dims.tp * dims.cp > hw.gpus_per_node:
        link = min(link, hw.network_bytes_per_s * LINK_EFFICIENCY)
    return max(0.0, volume / link - attention_s)
