"""bench/gpu_check.py's step runner: a step that fails, is skipped or outruns its budget is recorded as such, and
a stopped step keeps the rows it saved and leaves nothing of itself running (torchrun runs in its own session)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from common import Skipped  # noqa: E402
from gpu_check import Step, run_step  # noqa: E402


def _headline(result: dict) -> str:
    return f"{len(result.get('rows', []))} rows"


def _slow(smoke, work, save):
    pid = subprocess.Popen(["sleep", "60"], start_new_session=True).pid  # as llaunch run starts torchrun
    (work / "grandchild").write_text(str(pid))
    save({"rows": [1]})
    time.sleep(60)


def _failing(smoke, work, save):
    raise ValueError("broken step")


def _skipped(smoke, work, save):
    raise Skipped("needs a GPU")


def _fine(smoke, work, save):
    return {"rows": [1, 2]}


def _run(tmp_path, fn, budget=30.0) -> dict:
    return run_step(Step(fn.__name__, budget, fn, _headline), True, tmp_path, tmp_path / f"{fn.__name__}.json", budget)


def test_a_step_over_budget_keeps_its_rows_and_leaves_nothing_running(tmp_path):
    record = _run(tmp_path, _slow, budget=3.0)
    assert record["status"] == "timeout" and "budget" in record["reason"]
    assert record["result"] == {"rows": [1]} and record["headline"] == "1 rows"
    assert json.loads((tmp_path / "_slow.json").read_text())["status"] == "timeout"
    grandchild = int((tmp_path / "grandchild").read_text())
    assert not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE


def test_failed_skipped_and_ok_steps_say_so(tmp_path):
    failed = _run(tmp_path, _failing)
    assert failed["status"] == "failed" and "broken step" in failed["error"]
    skipped = _run(tmp_path, _skipped)
    assert skipped["status"] == "skipped" and skipped["reason"] == "needs a GPU"
    fine = _run(tmp_path, _fine)
    assert fine["status"] == "ok" and fine["result"] == {"rows": [1, 2]} and fine["headline"] == "2 rows"
