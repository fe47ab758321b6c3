"""Every GPU measurement in one call, each step in its own forked process under its own time budget.

Run through bench/gpu_check.sh (which installs the carried wheels first). A step that fails, is skipped or
outruns its budget leaves the other steps' JSON intact; a step stopped at its budget keeps the rows it had
saved. Writes OUT/<step>-<tag>.json for each step and OUT/gpu-check-<tag>.json (statuses + the table), and
prints the table last. --smoke runs the same steps with each bench script's smoke shapes (tiny, CPU, fp32).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import checkpoint
import fp8_cp
import memory_truth
import planner_check
import qlora
import throughput
from common import GPU_CHECK_TRAIN_BYTES, Shapes, Skipped, write_json

COMPILE_ON_CPU = "torch.compile on a CPU runner spends minutes compiling C++; the GPU run measures the compiled row"


def run_memory(smoke: bool, work: Path, save) -> dict:
    rows = memory_truth.run_rows(memory_truth.SMOKE if smoke else memory_truth.GPU_CHECK,
                                 seq=memory_truth.SMOKE_SEQ if smoke else memory_truth.SEQ,
                                 steps=memory_truth.SMOKE_STEPS if smoke else memory_truth.STEPS, work=work,
                                 save=lambda rows: save({"rows": rows}))
    return {"rows": rows}


def run_throughput(smoke: bool, work: Path, save) -> dict:
    shapes = Shapes.smoke() if smoke else Shapes(steps=40, max_train_bytes=GPU_CHECK_TRAIN_BYTES)
    result = throughput.compare(shapes, work, compile_layers=not smoke, save=save)
    if smoke:
        result["compiled_skipped"] = COMPILE_ON_CPU
    return result


def run_qlora(smoke: bool, work: Path, save) -> dict:
    shapes = qlora.QLoRAShapes.smoke() if smoke else qlora.QLoRAShapes()
    return {"rows": qlora.measure(shapes, work, save=lambda rows: save({"rows": rows}))}


def run_checkpoint(smoke: bool, work: Path, save) -> dict:
    # The H100 run timed the resume (29 s); here the blocking times alone, to fit the call.
    if smoke:
        return checkpoint.measure(Shapes.smoke(), work)
    return checkpoint.measure(dataclasses.replace(checkpoint.SHAPES, max_train_bytes=GPU_CHECK_TRAIN_BYTES), work,
                              resume=False)


def run_planner(smoke: bool, work: Path, save) -> dict:
    shapes = planner_check.PlannerShapes.smoke() if smoke else planner_check.PlannerShapes()
    return planner_check.measure(shapes, work, save=save)


def run_fp8(smoke: bool, work: Path, save) -> dict:
    shapes = Shapes.smoke() if smoke else Shapes(steps=30, max_train_bytes=GPU_CHECK_TRAIN_BYTES)
    return fp8_cp.measure_fp8(shapes, work, smoke, save=save)


def run_cp(smoke: bool, work: Path, save) -> dict:
    shapes = Shapes.smoke() if smoke else Shapes(seq=8192, micro=1)  # long sequences are what cp is for
    return fp8_cp.measure_cp(shapes, work)


def headline_memory(result: dict) -> str:
    rows = result.get("rows", [])
    skipped = sum("skipped" in r["measured"] for r in rows)
    failed = sum("error" in r["measured"] for r in rows)
    return f"{memory_truth.summary(rows)}; {skipped} skipped, {failed} failed"


def headline_throughput(result: dict) -> str:
    if "tokens_per_s" not in result:
        return "no row finished"
    text = (f"llaunch {result['tokens_per_s']:,.0f} tok/s ({_pct(result['mfu'])} MFU) vs HF Trainer "
            f"{result['hf_trainer_tokens_per_s']:,.0f}: {result['speedup_vs_hf_trainer']:.2f}x")
    if "compiled" in result:
        c = result["compiled"]
        text += f"; compiled {c['tokens_per_s']:,.0f} ({_pct(c['mfu'])}): {c['speedup_vs_hf_trainer']:.2f}x"
    return text


def headline_qlora(result: dict) -> str:
    rows = result.get("rows", [])
    return "; ".join(f"{r['base']}: {r['tokens_per_s']:,.0f} tok/s, peak {_num(r['peak_memory_gib'], '.1f')} GiB"
                     for r in rows) or "no row finished"


def headline_checkpoint(result: dict) -> str:
    if "blocked_sync_s" not in result:
        return "no result"
    text = (f"blocked sync {result['blocked_sync_s']:.2f} s vs async {result['blocked_async_s']:.2f} s "
            f"({result['checkpoint_gib']:.2f} GiB, published after {result['background_s']:.1f} s)")
    if "resume_to_first_step_s" in result:
        text += f"; resume to first step {result['resume_to_first_step_s']:.1f} s"
    return text


def headline_planner(result: dict) -> str:
    rows = result.get("rows", [])
    if not rows:
        return "no candidate measured"
    pick = rows[0]
    text = f"pick {pick['label']} predicted {pick['predicted_tokens_per_s']:,.0f} tok/s"
    if "measured_tokens_per_s" in pick:
        text += f", measured {pick['measured_tokens_per_s']:,.0f}"
    if "measured_best" in result:
        text += (f"; measured best of {len(rows)}: {result['measured_best']} "
                 f"(pick at {result['pick_vs_measured_best']:.0%} of it)")
    return text


def headline_fp8(result: dict) -> str:
    rows = result.get("rows", {})
    if "fp8" not in rows:
        return "no fp8 run finished"
    fp8 = rows["fp8"]
    return (f"fp8 {fp8['tokens_per_s']:,.0f} tok/s, {result['speedup']:.2f}x amp-bf16 (plan {fp8['plan_gpu']}: "
            f"{result['predicted_speedup']:.2f}x, {fp8['predicted_tokens_per_s']:,.0f}); loss within "
            f"{result['max_rel_loss_diff']:.2%} of amp-bf16; peak {_num(fp8['peak_memory_gib'], '.2f')} GiB "
            f"(plan {fp8['predicted_peak_gib']:.2f})")


def headline_cp(result: dict) -> str:
    rows = result.get("rows", {})
    if "ring" not in rows:
        return "no result"
    ring, sdpa = rows["ring"], rows["sdpa"]
    return (f"ring attention on cp {result['cp']}: loss within {result['rel_loss_diff']:.2%} of SDPA's, "
            f"{ring['step_s']:.2f} s vs {sdpa['step_s']:.2f} s, peak {_num(ring['peak_gib'], '.1f')} vs "
            f"{_num(sdpa['peak_gib'], '.1f')} GiB")


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _num(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


@dataclass
class Step:
    name: str
    budget_s: float  # on the H200; the whole check must end inside one 10-minute device call
    run: Callable[[bool, Path, Callable], dict]
    headline: Callable[[dict], str]


# The headline numbers first: a run cut short by the call's limit loses the last steps, not the first.
# Budgets from the H100 runs (bench/results/*-h100.json): a 1.1B `llaunch run` of 40 steps ~35 s, HF Trainer
# ~25 s, compiling ~60 s; a 1.1B checkpoint 11 GiB, 39 s sync + 44 s async in the background; a memory row ~12 s.
STEPS = [
    Step("throughput", 150, run_throughput, headline_throughput),
    Step("qlora", 130, run_qlora, headline_qlora),
    Step("checkpoint", 100, run_checkpoint, headline_checkpoint),
    Step("planner", 75, run_planner, headline_planner),
    Step("memory", 150, run_memory, headline_memory),
    Step("fp8", 90, run_fp8, headline_fp8),
    Step("cp", 40, run_cp, headline_cp),
]
# Kept between steps: the token cache and the 1.1B random model (QLoRA and memory rows load it). The rest
# (run directories, checkpoints, the 8B's 16 GB) goes after each step: the H200 machine has a 64 GiB disk.
KEEP = {"cache", "random-llama-1.1b"}


def preload() -> None:
    """Import the heavy libraries once, here: every forked step starts with them (a Python start with torch
    and transformers costs tens of seconds on a loaded CPU runner). Nothing here may touch CUDA, or the
    forked steps could not."""
    import peft  # noqa: F401
    import torch
    from transformers import AutoModelForCausalLM, Trainer  # noqa: F401

    import launcher.train.loop  # noqa: F401

    if torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialised before the steps were forked; they would fail to use it")


def child(step: Step, smoke: bool, work: Path, path: Path) -> None:
    """In the forked process: run the step, record how it ended, never return into the parent's loop."""
    started = time.time()

    def record(status: str, **fields) -> None:
        write_json(path, {"step": step.name, "status": status, "wall_s": time.time() - started, **fields})

    code = 0
    try:
        record("ok", result=step.run(smoke, work, lambda partial: record("running", result=partial)))
    except Skipped as why:
        record("skipped", reason=str(why))
    except BaseException:
        record("failed", error=traceback.format_exc()[-3000:])
        sys.stderr.write(traceback.format_exc())
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # never back into the parent's loop


def kill_tree(pid: int) -> None:
    """The step and everything it started: `llaunch run` puts torchrun in a session of its own, so a process
    group kill would leave the ranks holding the GPU for the next step."""
    import psutil

    parent = psutil.Process(pid)
    for proc in [*parent.children(recursive=True), parent]:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def run_step(step: Step, smoke: bool, work: Path, path: Path, budget: float) -> dict:
    sys.stdout.flush()
    sys.stderr.flush()
    started = time.time()
    pid = os.fork()
    if pid == 0:
        child(step, smoke, work, path)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() - started > budget:
            kill_tree(pid)
            os.waitpid(pid, 0)
            status = None
            break
        time.sleep(0.2)
    wall = time.time() - started
    record = json.loads(path.read_text()) if path.exists() else {"step": step.name}
    if status is None:
        record.update(status="timeout", reason=f"stopped at its budget of {budget:.0f} s")
    elif record.get("status") in (None, "running"):  # died without saying why (OOM kill, segfault)
        record.update(status="failed", error=f"exit status {os.waitstatus_to_exitcode(status)}")
    record.update(wall_s=wall, budget_s=budget, headline=step.headline(record.get("result", {})))
    write_json(path, record)
    return record


def table(records: list[dict], mode: str) -> str:
    lines = [f"GPU check ({mode}), {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"{'step':<11} {'status':<8} {'wall s':>7}  result"]
    for r in records:
        detail = r.get("reason") or (r["error"].strip().splitlines()[-1] if r.get("error") else "")
        text = r["headline"] if r["status"] in ("ok", "timeout") else ""
        text = "; ".join(part for part in (text, detail) if part)
        lines.append(f"{r['step']:<11} {r['status']:<8} {r['wall_s']:>7.1f}  {text}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, for CI")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()),
                        help="a fresh directory is made in here for the data cache, random models and runs, "
                             "and removed at the end")
    parser.add_argument("--tag", help="file name suffix; default h200, or smoke with --smoke")
    parser.add_argument("--total-s", type=float, default=520, help="all steps together (each also has its own)")
    parser.add_argument("--only", nargs="+", choices=[s.name for s in STEPS], help="run these steps only")
    args = parser.parse_args()
    tag = args.tag or ("smoke" if args.smoke else "h200")
    mode = "smoke: tiny shapes, CPU, fp32" if args.smoke else "GPU"
    deadline = time.time() + args.total_s
    preload()
    args.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="llaunch-gpu-check-", dir=args.work))
    records = []
    try:
        for step in STEPS:
            if args.only and step.name not in args.only:
                continue
            path = args.out / f"{step.name}-{tag}.json"
            path.unlink(missing_ok=True)
            budget = max(1.0, min(step.budget_s, deadline - time.time()))
            print(f"== {step.name} (budget {budget:.0f} s)", flush=True)
            records.append(run_step(step, args.smoke, work, path, budget))
            for entry in work.iterdir():
                if entry.name in KEEP:
                    continue
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = table(records, mode)
    fields = ("step", "status", "wall_s", "budget_s", "reason", "error", "headline")
    write_json(args.out / f"gpu-check-{tag}.json",
               {"mode": mode, "steps": [{k: r.get(k) for k in fields} for r in records], "table": text})
    print("\n" + text, flush=True)


if __name__ == "__main__":
    main()
