"""Why the planner chose a candidate, in sentences the plan keeps: its peak against the limit, what it beat,
and what it needed (checkpointing, offload, a layout and whether the ranks run it)."""

from __future__ import annotations

import dataclasses

from launcher.errors import LaunchError
from launcher.planning.plan import PREFIX, STRATEGY_ORDER, check_runnable
from launcher.units import format_bytes


def plan_reasons(chosen, candidates: list) -> list[str]:
    """At most three sentences: the peak against the limit, why this candidate over the next, what it needed."""
    s, m = chosen.setup, chosen.memory
    where = "host RAM per process" if s.device == "cpu" else "the GPU limit"
    reasons = [f"peak {format_bytes(m.peak_bytes)} allocated ({m.peak_phase} phase), {format_bytes(m.reserved_bytes)} "
               f"reserved, within {format_bytes(chosen.limit_bytes)} ({where})."]
    if s.method == PREFIX:
        reasons.append("prefix tuning is sized as a full fine-tune: an upper bound, as only the prefix trains.")
    if s.device == "cpu":
        reasons.append("no GPU visible: running on CPU in fp32 with gloo, one process per requested GPU slot.")
        return reasons
    if chosen.paged_to_host_bytes:
        reasons.append(f"{s.optimizer} keeps {format_bytes(chosen.paged_to_host_bytes)} of optimizer state in host "
                       f"RAM, paged in for each step ({chosen.time_terms['offload_s']:.2f} s of PCIe per step).")
    fitting = [c for c in candidates if c.fits]
    others = [c for c in fitting if c is not chosen]
    if others:
        runner_up = others[0]
        reasons.append(f"fastest that fits: {chosen.tokens_per_s:,.0f} tokens/s vs {runner_up.tokens_per_s:,.0f} "
                       f"for {runner_up.label}.")
    if not s.parallel.pure_data_parallel:
        reasons.append(_layout_reason(chosen, candidates))
    if s.is_hsdp:
        reasons.append(_hsdp_reason(chosen, candidates))
    simpler = [c for c in candidates if not c.fits and STRATEGY_ORDER[c.setup.strategy] < STRATEGY_ORDER[s.strategy]]
    if simpler:
        best = min(simpler, key=lambda c: c.memory.reserved_bytes)
        reasons.append(f"{best.setup.strategy} does not fit: it needs {format_bytes(best.memory.reserved_bytes)} per GPU.")
    elif s.recomputes:
        reasons.append("activation checkpointing is on: without it the activations do not fit (or run slower at a smaller micro-batch).")
    if s.offloads:
        reasons.append(f"offload {s.offload}: nothing fits in GPU memory without it.")
    return reasons[:3]


def _layout_reason(chosen, candidates: list) -> str:
    """Why tp / pp / cp / ep over data parallelism alone (slower, too big, or the batch does not split over that
    many ranks), what ep did, and whether the ranks run it (check_runnable's sentence where they do not)."""
    plain = [c for c in candidates if c.setup.parallel.pure_data_parallel]
    fitting = [c for c in plain if c.fits]
    layout = chosen.setup.parallel.label()
    if fitting:
        why = f"{layout}: data parallelism alone reaches {fitting[0].tokens_per_s:,.0f} tokens/s at best ({fitting[0].label})"
    elif plain:
        smallest = min(plain, key=lambda c: c.memory.reserved_bytes)
        why = (f"{layout}: data parallelism alone needs {format_bytes(smallest.memory.reserved_bytes)} per GPU at "
               f"best ({smallest.label})")
    elif chosen.setup.global_batch % chosen.setup.world_size == 0:  # data parallelism alone was not weighed
        why = f"{layout}: the layout asked for"
    else:
        why = (f"{layout}: the global batch of {chosen.setup.global_batch} sequences does not split over "
               f"{chosen.setup.world_size} data-parallel ranks")
    if chosen.setup.parallel.ep_enabled:
        why += "; " + _ep_reason(chosen, candidates)
    try:
        check_runnable(chosen.setup)
    except LaunchError as refusal:
        return f"{why}; `llaunch run` and `submit` would refuse it as it stands: {refusal}"
    return f"{why}; `llaunch run` and `submit` run it as planned."


def _ep_reason(chosen, candidates: list) -> str:
    """What ep did: the routed experts split over it, against the best other ep of the same tp / pp / cp / etp,
    and under tp why this etp (experts split over tp, or whole on each tp rank) over the other."""
    dims = chosen.setup.parallel
    shape = (dims.tp, dims.pp, dims.cp)
    same = [c for c in candidates if c.setup.parallel.ep != dims.ep and c.setup.parallel.etp == dims.etp
            and (c.setup.tp, c.setup.pp, c.setup.cp) == shape]
    why = f"ep {dims.ep} holds 1/{dims.ep} of the routed experts (and their states)"
    if dims.etp_enabled:
        why += f" on each tp group, split over its {dims.tp} GPUs (etp {dims.etp}): 1/{dims.ep * dims.tp} per GPU"
    else:
        why += " whole on each GPU" + (f", their tokens split over tp {dims.tp} (etp 1)" if dims.tp_enabled else "")
    if same:
        why += f" (ep {_best(same).setup.parallel.ep}: {_verdict(_best(same))})"
    if dims.tp_enabled:
        other = [c for c in candidates if c.setup.parallel.ep_enabled and c.setup.parallel.etp != dims.etp
                 and (c.setup.tp, c.setup.pp, c.setup.cp) == shape]
        if other:
            best = _best(other)
            why += f", over etp {best.setup.parallel.etp} (ep {best.setup.parallel.ep}: {_verdict(best)})"
    return why


def _best(candidates: list):
    """The fastest that fits, else the smallest."""
    return min(candidates, key=lambda c: (not c.fits, -c.tokens_per_s if c.fits else c.memory.reserved_bytes))


def _verdict(candidate) -> str:
    return (f"{candidate.tokens_per_s:,.0f} tokens/s" if candidate.fits
            else f"needs {format_bytes(candidate.memory.reserved_bytes)} per GPU")


def _hsdp_reason(chosen, candidates: list) -> str:
    """Why HSDP: its collectives mostly stay on the node's links; FSDP's ring at the same knobs crosses the network."""
    s = chosen.setup
    why = (f"hsdp shards over the {s.world_size // s.nodes} GPUs of a node and replicates across {s.nodes} nodes: "
           f"only gradient shards cross the network ({chosen.time_terms['comm_s']:.3f} s of collectives per step")
    same = [c for c in candidates if c.setup == dataclasses.replace(s, strategy="fsdp")]
    if same:
        why += f" vs {same[0].time_terms['comm_s']:.3f} s for fsdp"
    return why + ")."
