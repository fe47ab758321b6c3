"""Every environment variable llaunch reads or writes, declared once: who writes it, who reads it, what it means.

Variables are llaunch's message layer between processes (a supervisor tells the ranks where their beacons go)
and its overrides for drills and tests (faults, watchdog settings). A module takes a variable's name from its
record here and never spells it; the test in tests/unit/test_env.py fails when one does. A process passes
variables to the processes it starts in their env dict, never by writing os.environ for another module.

The supervision settings (collective timeout, watchdog) have three homes besides their variable: the train
config's `supervision` section, the cluster profile and the default. The variable wins (a drill or a test must
not edit the config), then the config (this job's choice), then the profile (the site's), then the default.
Torch-free and import-light: the ranks and every launcher module read it.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

from launcher.errors import LaunchError


@dataclass(frozen=True)
class EnvVar:
    name: str
    writer: str  # who sets it: a module, or "user" for an override a person or a test sets
    readers: str  # the modules that read it (the first one parses it)
    meaning: str

    def get(self, env=None) -> str:
        """The value, stripped; "" when unset."""
        return (os.environ if env is None else env).get(self.name, "").strip()


RUN_LOCK_HELD = EnvVar("LLAUNCH_RUN_LOCK_HELD", "launcher.cli.run", "launcher.train.loop",
                       "the run directory whose lock the parent `llaunch run` holds: rank 0 need not take it")
INCARNATION = EnvVar("LLAUNCH_INCARNATION", "launcher.cli.run, cluster.executor.NodeTask",
                     "launcher.observe.event_ledger", "this launch's id, on every event the ranks add to the ledger")
BEACON_DIR = EnvVar("LLAUNCH_BEACON_DIR", "launcher.runtime.watchdog.Watchdog.rank_env", "launcher.train.progress",
                    "the folder of the ranks' progress beacons; without it a rank writes none")
SUPERVISOR_PID = EnvVar("LLAUNCH_SUPERVISOR_PID", "launcher.runtime.torchrun, cluster.executor.NodeTask",
                        "launcher.runtime.signals.die_with_supervisor",
                        "the process whose end ends torchrun's agent and the ranks (PR_SET_PDEATHSIG)")
DIST_TIMEOUT_S = EnvVar("LLAUNCH_DIST_TIMEOUT_S", "user; cluster.submission.node_command, launcher.cli.run",
                        "launcher.env.dist_timeout_s, launcher.train.distributed",
                        "seconds a collective waits before it fails the job (supervision.dist_timeout_s)")
WATCHDOG = EnvVar("LLAUNCH_WATCHDOG", "user", "launcher.runtime.watchdog_config.WatchdogConfig.resolve",
                  "key=number pairs over supervision.watchdog (e.g. floor_s=30,poll_s=0.5), or off")
FAULT = EnvVar("LLAUNCH_FAULT", "user", "launcher.train.faults", "faults the ranks inject (docs/faults.md)")
DOCTOR_FAULT = EnvVar("LLAUNCH_DOCTOR_FAULT_", "user", "cluster.doctor.faults",
                      "the prefix of the doctor's fault hooks: PORT, LOCAL_STORAGE, VERSION, NVML, MIN_FREE_BYTES")
CACHE = EnvVar("LLAUNCH_CACHE", "user", "launcher.env.cache_root",
               "where tokenized corpora are cached when data.cache_dir is unset (default ~/.cache/llaunch)")
HOME = EnvVar("LLAUNCH_HOME", "user", "launcher.env.home",
              "llaunch's per-user state: job records, the cluster's job history, node ledgers (default ~/.llaunch)")
SLURM_DIR = EnvVar("LLAUNCH_SLURM_DIR", "user", "launcher.env.slurm_dir (cluster.local)",
                   "the state directory of the local SLURM cluster (default /tmp/llaunch-slurm)")
REQUIRE_SLURM = EnvVar("LLAUNCH_REQUIRE_SLURM", "CI", "tests/slurm/conftest.py",
                       "1: a missing SLURM fails tests/slurm instead of skipping them")
UPDATE_GOLDEN = EnvVar("LLAUNCH_UPDATE_GOLDEN", "developer", "tests/unit (golden files)",
                       "set: the golden tests rewrite their files instead of comparing")
SLURM_CONF = EnvVar("SLURM_CONF", "user; cluster.local.slurm_env (env dict)",
                    "SLURM's commands, cluster.jobs.JobRecord, cluster.slurm_checks.slurm_reachable",
                    "SLURM's own: the slurm.conf its commands (and submitit's sbatch) reach the cluster through")
PYTHONPATH = EnvVar("PYTHONPATH", "cluster.snapshot (the sbatch script), cluster.submission.ContainerJob",
                    "python (the node task, torchrun, the ranks)",
                    "python's own: a submitted job's frozen code first, so every node and requeue imports it")
# What a job's notify hook (`--notify CMD`, a profile's `notify:`) finds in its environment (cluster.notify).
JOB_ID = EnvVar("LLAUNCH_JOB_ID", "cluster.notify", "the user's notify hook", "the SLURM job id")
JOB_STATE = EnvVar("LLAUNCH_JOB_STATE", "cluster.notify", "the user's notify hook",
                   "the state the job changed to, one of cluster.notify.STATES (lower case)")
JOB_STEP = EnvVar("LLAUNCH_JOB_STEP", "cluster.notify", "the user's notify hook",
                  "the newest step rank 0 logged; empty before the first")
JOB_LOSS = EnvVar("LLAUNCH_JOB_LOSS", "cluster.notify", "the user's notify hook",
                  "the training loss at that step; empty before the first")
JOB_DIR = EnvVar("LLAUNCH_JOB_DIR", "cluster.notify", "the user's notify hook", "the job's directory")

VARIABLES = (RUN_LOCK_HELD, INCARNATION, BEACON_DIR, SUPERVISOR_PID, DIST_TIMEOUT_S, WATCHDOG, FAULT, DOCTOR_FAULT,
             CACHE, HOME, SLURM_DIR, REQUIRE_SLURM, UPDATE_GOLDEN, SLURM_CONF, PYTHONPATH, JOB_ID, JOB_STATE, JOB_STEP, JOB_LOSS,
             JOB_DIR)
DEFAULT_SLURM_DIR = "/tmp/llaunch-slurm"
DIST_TIMEOUT_RANGE = (1, 1e7)  # seconds: below, no collective could finish; above, none would ever time out


@contextlib.contextmanager
def slurm_conf_for_submitit(env):
    """submitit runs sbatch in this process's environment and takes none of its own: env's SLURM_CONF is in
    os.environ for the call alone and restored after it, so no other code of this process sees it changed."""
    before, value = os.environ.get(SLURM_CONF.name), SLURM_CONF.get(env)
    if value:
        os.environ[SLURM_CONF.name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(SLURM_CONF.name, None)
        else:
            os.environ[SLURM_CONF.name] = before


def home(env=None) -> Path:
    return Path(HOME.get(env) or Path.home() / ".llaunch")


def records_dir(env=None) -> Path:
    """Where `llaunch submit` records each job (JOB_ID.json) for status, logs and cancel."""
    return home(env) / "jobs"


def history_dir(env=None) -> Path:
    """Where each cluster's list of earlier job dirs lives (launcher.observe.history)."""
    return home(env) / "history"


def node_ledger_dir(env=None) -> Path:
    """Where each cluster profile's node ledger lives (launcher.observe.node_ledger)."""
    return home(env) / "ledger"


def slurm_dir(env=None) -> Path:
    """The local SLURM cluster's state directory (`llaunch cluster up`)."""
    return Path(SLURM_DIR.get(env) or DEFAULT_SLURM_DIR)


def cache_root(cache_dir: str | None, env=None) -> Path:
    """The token cache's root: data.cache_dir, else LLAUNCH_CACHE, else ~/.cache/llaunch."""
    return Path(cache_dir or CACHE.get(env) or Path.home() / ".cache" / "llaunch").expanduser()


def dist_timeout_s(env=None, config: float | None = None, profile: float | None = None) -> float | None:
    """The collective timeout: LLAUNCH_DIST_TIMEOUT_S, else the config's, else the profile's; None: torch's."""
    text = DIST_TIMEOUT_S.get(env)
    if not text:
        return config if config is not None else profile
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    low, high = DIST_TIMEOUT_RANGE
    if not low <= seconds <= high:  # nan too
        raise LaunchError(f"{DIST_TIMEOUT_S.name}={text!r} must be a number of seconds from 1 to 1e7; unset it "
                          f"(supervision.dist_timeout_s, the cluster profile's, or torch's default).")
    return seconds
