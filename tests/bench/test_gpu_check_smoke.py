"""bench/gpu_check.sh --smoke: every step of the one-call GPU check runs on a CPU, or says why it cannot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_smoke_runs_every_step_and_prints_the_table(tmp_path):
    sys.path.insert(0, str(BENCH))
    from gpu_check import STEPS

    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--smoke", "--out", str(out), "--work",
                           str(tmp_path / "work")], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    summary = json.loads((out / "gpu-check-smoke.json").read_text())
    assert [s["step"] for s in summary["steps"]] == [s.name for s in STEPS]
    for step in summary["steps"]:
        record = json.loads((out / f"{step['step']}-smoke.json").read_text())
        assert record["status"] == step["status"]
        assert step["status"] in ("ok", "skipped"), step
        if step["status"] == "skipped":
            assert step["reason"], step
        else:
            assert record["result"], step
    assert summary["table"] in done.stdout  # printed, last
    assert all(f"\n{s.name:<11} " in summary["table"] for s in STEPS)

    statuses = {s["step"]: s["status"] for s in summary["steps"]}
    if not torch.cuda.is_available():  # no CUDA peak to report: the rows say so instead of inventing one
        qlora = json.loads((out / "qlora-smoke.json").read_text())["result"]["rows"]
        assert statuses["qlora"] == "ok" and all(row["peak_memory_gib"] is None for row in qlora)  # NF4 runs on CPU
        memory = json.loads((out / "memory-smoke.json").read_text())["result"]["rows"]
        for row in memory:
            measured = row["measured"]
            assert "skipped" in measured or (measured["max_allocated"] is None and measured["peak_skipped"]), row
        assert any(row["config"]["method"] == "qlora" and "skipped" not in row["measured"] for row in memory)
