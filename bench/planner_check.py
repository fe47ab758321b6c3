"""The planner's pick against its own candidates, measured: does the fastest predicted plan train fastest?

    PYTHONPATH=. python bench/planner_check.py --out bench/results/planner-h200.json
    PYTHONPATH=. python bench/planner_check.py --smoke --out /tmp/planner-smoke.json   # tiny, CPU, fp32

The planner ranks every (micro-batch, checkpointing) candidate for TinyLlama-1.1B at seq 2048 on this GPU (one
rank, DDP); the top fitting ones are measured as bench/memory_truth.py measures a row (peak memory, median step
time). --smoke ranks a tiny model as if on an H200 (the datasheet's, not a probe) and measures on the CPU in
fp32, where there is no CUDA peak.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import memory_truth
from common import write_json


@dataclass
class PlannerShapes:
    size: str = "llama-1.1b"  # a memory_truth.SIZES name
    seq: int = 2048
    candidates: int = 4  # the top fitting ones, by predicted tokens/s
    steps: int = 4
    smoke: bool = False

    @classmethod
    def smoke(cls) -> "PlannerShapes":
        return cls(size="tiny", seq=memory_truth.SMOKE_SEQ, candidates=2, steps=memory_truth.SMOKE_STEPS, smoke=True)


def hardware(smoke: bool):
    """This machine as the planner sees it; --smoke: one H200 from the datasheet."""
    from launcher.planning.hardware import Hardware, probe

    if smoke:
        return Hardware(gpu_name_override="H200", gpus_per_node_override=1, ram_bytes=128 * 2**30)
    return probe()


def measure(shapes: PlannerShapes, work: Path, save=lambda result: None) -> dict:
    from launcher.planning.models import load_model_spec
    from launcher.planning.planner import PlanRequest, rank_candidates

    base, overrides = memory_truth.SIZES[shapes.size]
    hw = hardware(shapes.smoke)
    request = PlanRequest(model=base, model_overrides=overrides, seq_len=shapes.seq)
    ranked = [c for c in rank_candidates(load_model_spec(base, overrides), request, hw) if c.fits]
    result = {"gpu": hw.gpu_name, "size": shapes.size, "seq_len": shapes.seq, "fitting": len(ranked), "rows": []}
    for rank, candidate in enumerate(ranked[:shapes.candidates]):
        s = candidate.setup
        precision = "fp32" if shapes.smoke else s.precision  # bf16 on a CPU measures nothing useful
        config = (shapes.size, precision, s.method, s.micro_batch, s.activation_checkpointing, s.optimizer)
        measured = memory_truth.measure_row(config, shapes.seq, shapes.steps, work)
        row = {"planner_rank": rank, "label": candidate.label, "precision": s.precision,
               "measured_precision": precision, "predicted_tokens_per_s": candidate.tokens_per_s,
               "predicted_reserved_bytes": candidate.memory.reserved_bytes,
               "predicted_peak_bytes": candidate.memory.peak_bytes, "measured": measured}
        if "step_s" in measured:
            row["measured_tokens_per_s"] = s.micro_batch * shapes.seq / measured["step_s"]
        result["rows"].append(row)
        result.update(compare(result["rows"]))  # after every row: a run stopped at its budget keeps a verdict
        save(result)
    return result


def compare(rows: list[dict]) -> dict:
    """The measured fastest of the candidates so far, and the pick's tokens/s as a fraction of it."""
    timed = [r for r in rows if "measured_tokens_per_s" in r]
    if not timed or timed[0]["planner_rank"] != 0:
        return {}
    best = max(timed, key=lambda r: r["measured_tokens_per_s"])
    return {"measured_best": best["label"], "pick_is_measured_best": best["planner_rank"] == 0,
            "pick_vs_measured_best": timed[0]["measured_tokens_per_s"] / best["measured_tokens_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("/tmp/llaunch-bench"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/planner-h200.json"))
    args = parser.parse_args()
    result = measure(PlannerShapes.smoke() if args.smoke else PlannerShapes(), args.work,
                     save=lambda r: write_json(args.out, r))
    for row in result["rows"]:
        print(row["label"], row["predicted_tokens_per_s"], row.get("measured_tokens_per_s"))


if __name__ == "__main__":
    main()
