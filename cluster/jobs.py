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

from launcher.env import SLURM_CONF, records_dir
from launcher.errors import LaunchError
from launcher.files import write_text_atomic
from launcher.runtime.torchrun import RANK_STARTS

TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
}
# Pending reasons SLURM keeps for as long as the partition, account or QOS stay as they are.
NEVER_STARTS = {
    "PartitionNodeLimit", "PartitionTimeLimit", "PartitionConfig", "BadConstraints", "InvalidAccount",
    "InvalidQOS", "AccountNotAllowed", "QOSNotAllowed",
}
_FIELD = re.compile(r"(\w+)=(\S*)")
_ERROR_LINE = re.compile(
    r"^\s*(?:\[[^\]]*\]:?\s*)?(llaunch: error: .*|[A-Za-z_.]*(?:Error|Exception|Interrupt)\b.*)$"
)


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
        return {**os.environ, SLURM_CONF.name: self.slurm_conf} if self.slurm_conf else dict(os.environ)

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
        if not re.fullmatch(r"\d+(_\d+)?", job_id):  # SLURM's id, or an array element's; never a path
            raise LaunchError(f"{job_id!r} is not a SLURM job id; give the number `llaunch submit` printed.")
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
    def never_starts(self) -> bool:
        return self.state == "PENDING" and self.reason in NEVER_STARTS

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
        raise LaunchError(f"SLURM is not reachable ({(result.stderr or '').strip()}); check {SLURM_CONF.name} or run `llaunch cluster up`.")
    if shutil.which("sacct"):
        acct = subprocess.run(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State,NodeList,ExitCode"],
                              env=env, capture_output=True, text=True, timeout=30)
        line = acct.stdout.strip().splitlines()[0] if acct.returncode == 0 and acct.stdout.strip() else ""
        if line:
            state, nodes, exit_code = (line.split("|") + ["", "", ""])[:3]
            return JobState(state=state.split()[0], nodes=nodes, exit_code=exit_code)
    return JobState(state="UNKNOWN", reason="SLURM no longer knows this job (finished long ago, no accounting)")


def wait_for_end(job_id: str, env: dict[str, str], poll_s: float = 2.0) -> JobState:
    """Block until the job reaches a final state (a requeued job goes back to PENDING and keeps us waiting);
    a job SLURM will never start is a LaunchError instead of a wait without end."""
    while True:
        state = job_state(job_id, env)
        if state.finished or state.state == "UNKNOWN":
            return state
        refuse_never_starting(job_id, state)
        time.sleep(poll_s)


def refuse_never_starting(job_id: str, state: JobState) -> None:
    if state.never_starts:
        raise LaunchError(f"job {job_id} can never start as the cluster is configured ({state.reason}: the "
                          f"request exceeds what the partition, account or QOS allow); `llaunch cancel {job_id}` "
                          f"and resubmit with fewer --nodes, a shorter --time or another --partition.")


def active_job_in(log_folder: Path, env: dict[str, str]) -> tuple[str, JobState] | None:
    """The job submitted into this job dir (submitit's <id>_submitted.pkl in its log folder) that has not
    ended yet, if any: a job dir belongs to one job at a time."""
    for path in sorted(Path(log_folder).glob("*_submitted.pkl")):
        job_id = path.name[: -len("_submitted.pkl")]
        state = job_state(job_id, env)
        if not state.finished and state.state != "UNKNOWN":
            return job_id, state
    return None


# Lines that only report that a rank failed, or what followed from it (torchrun's agent, the node task
# passing on torchrun's exit code); the rank's own error says why.
_WRAPPER_ERRORS = ("ChildFailedError", "RendezvousConnectionError", "RendezvousClosedError", "RendezvousError")
# ... and what a surviving peer raises when another rank died: collateral, never the cause.
_COLLATERAL_ERRORS = ("DistNetworkError",)
_COLLATERAL_MESSAGES = ("Connection closed by peer", "Connection reset by peer")
_NODE_TASK_ERROR = "TrainingError"  # the node task's own reason (not requeued, stopped by, allocation) ...
_NODE_TASK_WRAPPER = "torchrun exited with code"  # ... unless it only passes on torchrun's failure
# ... or only reports a signal: when one node's rank fails, SLURM ends the step with SIGTERM on the others, so
# "stopped by SIGTERM" is then what followed from the failure, and the failing rank's own error says why.
NODE_TASK_SIGNALLED = "stopped by "
# Where each attempt of a node begins in its .out (the node task's command line) and .err.
_ATTEMPT_START = re.compile(r"^\[llaunch\] (?:node .*, )?attempt \d+")


def _newest_attempt(path: Path) -> list[str]:
    """The lines a node's log got in the job's newest attempt (logs are appended across requeues)."""
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    starts = [i for i, line in enumerate(lines) if _ATTEMPT_START.match(line)]
    return lines[starts[-1] if starts else 0:]


def node_of_rank(record: JobRecord, rank: int) -> int | None:
    """The node whose log shows global rank `rank` starting in the newest attempt that got that far, or None."""
    marker = RANK_STARTS.split("{world}")[0].format(rank=rank)  # "[llaunch] rank R of "
    found = [(path.stat().st_mtime, node) for node in range(record.nodes)
             for path in record.log_paths(node)[:1] if any(line.startswith(marker) for line in _newest_attempt(path))]
    return max(found)[1] if found else None


def last_error(paths: list[Path]) -> str | None:
    """Why the job ended, from its logs' newest attempt: the node task's own decision if it made one, else a
    rank's one-sentence `llaunch: error: ...`, else the newest exception of a rank, else the stop signal a node
    task received, else what torchrun or the node task reported about a failed rank."""
    decisions, sentences, exceptions, signalled, wrappers = [], [], [], [], []
    for path in sorted((p for p in paths if p.exists()), key=lambda p: p.stat().st_mtime):
        for line in _newest_attempt(path):
            match = _ERROR_LINE.match(line)
            if not match or ":" not in match.group(1):
                continue
            text = match.group(1).strip()
            name, message = (part.strip() for part in text.split(":", 1))
            if text.startswith("llaunch: error:"):
                sentences.append(text)
            elif any(w in name for w in _WRAPPER_ERRORS + _COLLATERAL_ERRORS) or message.startswith(_NODE_TASK_WRAPPER) \
                    or any(m in message for m in _COLLATERAL_MESSAGES):
                wrappers.append(text)
            elif _NODE_TASK_ERROR in name and message.startswith(NODE_TASK_SIGNALLED):
                signalled.append(message)
            elif _NODE_TASK_ERROR in name:
                decisions.append(message)
            else:
                exceptions.append(text)
    for found in (decisions, sentences, exceptions, signalled, wrappers):
        if found:
            return found[-1]
    return None


def cancel(job_id: str, env: dict[str, str]) -> None:
    result = subprocess.run(["scancel", str(job_id)], env=env, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise LaunchError(f"scancel {job_id} failed ({result.stderr.strip()}); is the cluster reachable?")
