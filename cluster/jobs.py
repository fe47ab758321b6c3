"""What `llaunch status|logs|cancel` know about a submitted job: its record (job id -> output dir, logs,
SLURM_CONF) and its live state from scontrol, which works without an accounting database; sacct is only
asked when scontrol has forgotten the job (after MinJobAge) and accounting exists."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from launcher.errors import LaunchError
from launcher.files import write_text_atomic

TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
}
_FIELD = re.compile(r"(\w+)=(\S*)")
_ERROR_LINE = re.compile(
    r"^\s*(?:\[[^\]]*\]:?\s*)?(llaunch: error: .*|[A-Za-z_.]*(?:Error|Exception|Interrupt)\b.*)$"
)


def records_dir() -> Path:
    return Path(os.environ.get("LLAUNCH_HOME", Path.home() / ".llaunch")) / "jobs"


@dataclass
class JobRecord:
    """Written by `llaunch submit`, so later commands find a job's files from its id alone."""

    job_id: str
    name: str
    output_dir: str
    log_folder: str
    nodes: int
    cluster: str
    slurm_conf: str = ""  # the SLURM_CONF the job was submitted with ("" = the system default)
    submitted_at: float = field(default_factory=time.time)

    def save(self) -> Path:
        return write_text_atomic(records_dir() / f"{self.job_id}.json", json.dumps(asdict(self), indent=2))

    def env(self) -> dict[str, str]:
        """The environment that reaches the cluster this job went to."""
        return {**os.environ, "SLURM_CONF": self.slurm_conf} if self.slurm_conf else dict(os.environ)

    def log_paths(self, node: int | None = None) -> list[Path]:
        """The per-node logs submitit's srun writes: <job>_<node>_log.out/.err, appended across requeues."""
        nodes = range(self.nodes) if node is None else [node]
        folder = Path(self.log_folder)
        return [folder / f"{self.job_id}_{n}_log.{ext}" for n in nodes for ext in ("out", "err")]


def load_record(job_id: str | None = None) -> JobRecord:
    """The record of job_id, or of the most recently submitted job."""
    folder = records_dir()
    if job_id is None:
        records = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime) if folder.exists() else []
        if not records:
            raise LaunchError("no job has been submitted from here yet; submit one with `llaunch submit CONFIG`.")
        path = records[-1]
    else:
        path = folder / f"{job_id}.json"
        if not path.exists():
            raise LaunchError(f"job {job_id} was not submitted with llaunch from here ({folder} has no record of it).")
    return JobRecord(**json.loads(path.read_text()))


def parse_scontrol_job(text: str) -> dict[str, str]:
    """`scontrol show job -o ID` as a dict (Key=Value tokens; values with spaces are cut, unused here)."""
    return dict(_FIELD.findall(text))


@dataclass
class JobState:
    state: str
    nodes: str = ""
    restarts: int = 0
    exit_code: str = ""
    reason: str = ""

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def failed_exit(self) -> str:
        """SLURM's `code:signal` when either is non-zero, else "" (a clean 0:0 is not worth a word)."""
        return self.exit_code if self.exit_code.strip("0:") else ""


def job_state(job_id: str, env: dict[str, str]) -> JobState:
    result = subprocess.run(["scontrol", "--oneliner", "show", "job", str(job_id)], env=env,
                            capture_output=True, text=True, timeout=30)
    if result.returncode == 0 and result.stdout.strip():
        fields = parse_scontrol_job(result.stdout)
        return JobState(
            state=fields.get("JobState", "UNKNOWN"),
            nodes=fields.get("NodeList", "") if fields.get("NodeList") != "(null)" else "",
            restarts=int(fields.get("Restarts", "0") or 0),
            exit_code=fields.get("ExitCode", ""),
            reason=fields.get("Reason", "") if fields.get("Reason") != "None" else "",
        )
    if "Invalid job id" not in (result.stderr or "") and result.returncode != 0:
        raise LaunchError(f"SLURM is not reachable ({(result.stderr or '').strip()}); check SLURM_CONF or run `llaunch cluster up`.")
    if shutil.which("sacct"):
        acct = subprocess.run(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State,NodeList,ExitCode"],
                              env=env, capture_output=True, text=True, timeout=30)
        line = acct.stdout.strip().splitlines()[0] if acct.returncode == 0 and acct.stdout.strip() else ""
        if line:
            state, nodes, exit_code = (line.split("|") + ["", "", ""])[:3]
            return JobState(state=state.split()[0], nodes=nodes, exit_code=exit_code)
    return JobState(state="UNKNOWN", reason="SLURM no longer knows this job (finished long ago, no accounting)")


def wait_for_end(job_id: str, env: dict[str, str], poll_s: float = 2.0) -> JobState:
    """Block until the job reaches a final state (a requeued job goes back to PENDING and keeps us waiting)."""
    while True:
        state = job_state(job_id, env)
        if state.finished or state.state == "UNKNOWN":
            return state
        time.sleep(poll_s)


def last_metrics(output_dir: str | Path) -> dict | None:
    """The newest line of OUTPUT/metrics.jsonl that has a training loss."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return None
    for line in reversed(path.read_text().splitlines()):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line still being written
        if isinstance(row, dict) and "loss" in row and "step" in row:
            return row
    return None


# Layers that only report that a rank failed; the rank's own error says why.
_WRAPPER_ERRORS = ("ChildFailedError", "TrainingError")


def last_error(paths: list[Path]) -> str | None:
    """The error that ended the job, from its logs: a rank's one-sentence `llaunch: error: ...` if there
    is one, else the last exception line that is not just torchrun or llaunch reporting a failed rank."""
    sentences, exceptions, wrappers = [], [], []
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            match = _ERROR_LINE.match(line)
            if not match or ":" not in match.group(1):
                continue
            text = match.group(1).strip()
            if text.startswith("llaunch: error:"):
                sentences.append(text)
            elif any(w in text.split(":")[0] for w in _WRAPPER_ERRORS):
                wrappers.append(text)
            else:
                exceptions.append(text)
    for found in (sentences, exceptions, wrappers):
        if found:
            return found[-1]
    return None


def cancel(job_id: str, env: dict[str, str]) -> None:
    result = subprocess.run(["scancel", str(job_id)], env=env, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise LaunchError(f"scancel {job_id} failed ({result.stderr.strip()}); is the cluster reachable?")
