"""Which numbers of interleaved chunks per pipeline rank (v) the planner weighs for one layout: its step time is
unimodal in v, its memory is not, and weighing every v is 3 x slower at 16,384 GPUs."""

from __future__ import annotations

import dataclasses

from launcher.planning.hardware import Hardware
from launcher.planning.models import ModelSpec
from launcher.planning.step_time_layout import pipeline_p2p_seconds


def weigh_virtual_stages(spec: ModelSpec, two, request, hw: Hardware, facts, evaluate) -> list:
    """An interleaved candidate at v = 2 chunks per rank, and at the v its step time is shortest and the most v:
    the step is a + b v + c / v (each chunk adds a point-to-point send per microbatch, b; the bubble is
    (p - 1) / (m v) of the rest, c), shortest at sqrt(c / b); and at the most v (one layer each), whose in-flight
    activations are the fewest, and a ladder of v in between, then every v beside the fastest rung that fits.
    `two` is the candidate at v = 2 and `evaluate(spec, setup, hw, facts)` the planner's rating of a setup."""
    s = two.setup
    if s.pp_schedule != "interleaved-1f1b" or s.pp == 1 or request.pp_virtual_stages is not None:
        return [two]
    most = (spec.layers + 2) // s.pp
    per_chunk = pipeline_p2p_seconds(spec, s, hw, facts) / 2
    # bubble_s = (rest + 2 b) (p - 1) / (2 m) at v = 2, so c = rest (p - 1) / m = 2 bubble_s - 2 b (p - 1) / m
    c = 2 * two.time_terms["bubble_s"] - 2 * per_chunk * (s.pp - 1) / s.gradient_accumulation_steps
    best = (c / per_chunk) ** 0.5 if per_chunk else most
    # Memory is not monotonic in v (fewer layers per chunk, more chunk-microbatches in flight, each with its
    # input and output), so a ladder of v is weighed; the step time is unimodal in v, so a faster v that fits can
    # only lie between the fastest rung that fits and the next rung towards the shortest step, where that one
    # does not fit: those are weighed one by one.
    ladder = {k * 2**e for e in range(7) for k in (1, 3)}
    rungs = sorted({2} | {min(most, max(2, v)) for v in (int(best), int(best) + 1, most, *ladder) if v <= most})

    def at(v: int):
        return evaluate(spec, dataclasses.replace(s, pp_virtual_stages=v), hw, facts)

    weighed = {2: two} | {v: at(v) for v in rungs[1:]}
    fitting = [v for v in rungs if weighed[v].fits]
    if fitting:
        fastest = max(fitting, key=lambda v: weighed[v].tokens_per_s)
        beyond = [v for v in rungs if (v - fastest) * (best - fastest) > 0]  # rungs towards the shortest step
        nearest = min(beyond, key=lambda v: abs(v - fastest), default=None)
        if nearest is not None and not weighed[nearest].fits:
            weighed |= {v: at(v) for v in range(min(fastest, nearest) + 1, max(fastest, nearest))}
    return list(weighed.values())
