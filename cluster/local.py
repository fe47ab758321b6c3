"""The local SLURM cluster behind `llaunch cluster up|down|status`: munged, slurmctld and two slurmd on this host
(`up --nodes N`: N of them; a cluster running another number without jobs is restarted with N).

Everything lives in one state directory (default /tmp/llaunch-slurm, or $LLAUNCH_SLURM_DIR): a private munge
key and socket, slurm.conf, controller state, spool and logs. The system's own munge and SLURM set-up are
never touched, so the cluster can run in a CI container or next to a real installation.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import string
import subprocess
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import psutil

from cluster.jobs import TERMINAL_STATES
from launcher.env import SLURM_CONF, slurm_dir
from launcher.errors import LaunchError

DAEMONS = ("slurmctld", "slurmd", "munged")
# scancel sends SIGTERM (the ranks checkpoint) and SIGKILL after KillWait (60 s in dev/slurm.conf).
JOBS_END_TIMEOUT_S = 120.0


def _pid_alive(pid_file: Path) -> int | None:
    """The pid in pid_file when that process is alive and is the daemon that wrote it (its command names the
    pid file's daemon), else None: a stale pid file whose pid the system gave to another process must never
    make `cluster down` signal that process."""
    try:
        pid = int(pid_file.read_text().strip())
        command = " ".join(psutil.Process(pid).cmdline())
    except (FileNotFoundError, ValueError, psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        return pid
    daemon = pid_file.stem.split("-")[0]  # munged.pid, slurmctld.pid, slurmd-n1.pid
    return pid if daemon in command else None


@dataclass
class LocalCluster:
    """A two-node cluster whose nodes are both this host, on private ports (so it never clashes with 6817/6818)."""

    state_dir: Path = field(default_factory=slurm_dir)
    nodes: int = 2
    cpus_per_node: int = 2
    memory_mb: int = 4000
    partition: str = "debug"
    node_prefix: str = "n"
    ctld_port: int = 16817
    slurmd_first_port: int = 17001

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).resolve()
        if self.state_dir.exists() and not self.state_dir.is_dir():
            raise LaunchError(f"the local cluster's state directory {self.state_dir} is a file; pass --state-dir "
                              f"with a directory (or none: {slurm_dir()}).")

    @property
    def conf_path(self) -> Path:
        return self.state_dir / "slurm.conf"

    @property
    def node_names(self) -> list[str]:
        return [f"{self.node_prefix}{i}" for i in range(1, self.nodes + 1)]

    def _pid_files(self) -> dict[str, Path]:
        run = self.state_dir / "run"
        files = {"munged": self.state_dir / "munge" / "munged.pid", "slurmctld": run / "slurmctld.pid"}
        files.update({f"slurmd {n}": run / f"slurmd-{n}.pid" for n in self.node_names})
        return files

    def running_nodes(self) -> list[str]:
        """The nodes whose slurmd runs, however many this cluster was started with."""
        pid_files = sorted((self.state_dir / "run").glob("slurmd-*.pid"))
        return [path.stem.removeprefix("slurmd-") for path in pid_files if _pid_alive(path)]

    def _resize(self, jobs_timeout_s: float) -> None:
        """Stop a cluster that runs another number of nodes than this one's (slurmctld reads its node list at
        start), unless it has jobs, which a restart would end."""
        running = self.running_nodes()
        if not running or running == self.node_names or not _pid_alive(self._pid_files()["slurmctld"]):
            return
        jobs = self._jobs()
        if jobs:
            raise LaunchError(f"the local cluster runs {len(running)} node(s) and job(s) {', '.join(jobs)}; wait for "
                              f"them to end (or `llaunch cancel` them), then `llaunch cluster up --nodes {self.nodes}`.")
        self.down(jobs_timeout_s)

    def env(self) -> dict[str, str]:
        """The environment SLURM commands need to reach this cluster."""
        return {**os.environ, SLURM_CONF.name: str(self.conf_path)}

    def is_running(self) -> bool:
        return all(_pid_alive(p) for p in self._pid_files().values())

    def up(self, timeout_s: float = 60.0) -> bool:
        """Start whatever is not running; True when something was started, False when it was all up already."""
        self._resize(JOBS_END_TIMEOUT_S)
        if self.is_running():
            return False
        for daemon in DAEMONS:
            if shutil.which(daemon) is None:
                raise LaunchError(
                    f"{daemon} is not installed; run `sudo bash {Path(__file__).parent / 'dev' / 'install.sh'}` first."
                )
        self._write_files()
        self._start_munged()
        if not _pid_alive(self._pid_files()["slurmctld"]):
            self._start(["slurmctld", "-f", str(self.conf_path)], "slurmctld")
        for node in self.node_names:
            if not _pid_alive(self._pid_files()[f"slurmd {node}"]):
                self._start(["slurmd", "-f", str(self.conf_path), "-N", node], f"slurmd-{node}")
        self._wait_idle(timeout_s)
        return True

    def down(self, jobs_timeout_s: float = JOBS_END_TIMEOUT_S) -> list[str]:
        """Cancel every job and wait until SLURM has ended them, then stop the daemons (slurmd, slurmctld,
        munged); return what was stopped. A job's processes outlive a stopped slurmd (slurmstepd carries on),
        so the daemons stay up, and this is an error, while a job is still ending."""
        if _pid_alive(self._pid_files()["slurmctld"]):
            self._end_jobs(jobs_timeout_s)
        stopped = []
        extra = {f"slurmd {n}": self.state_dir / "run" / f"slurmd-{n}.pid" for n in self.running_nodes()}
        for name, pid_file in sorted({**self._pid_files(), **extra}.items(), key=lambda kv: kv[0] == "munged"):
            pid = _pid_alive(pid_file)
            if pid is None:
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while _pid_alive(pid_file) == pid and time.monotonic() < deadline:
                time.sleep(0.2)
            if _pid_alive(pid_file) == pid:
                os.kill(pid, signal.SIGKILL)
            stopped.append(name)
        return stopped

    def _jobs(self) -> list[str]:
        """Every job SLURM has not ended yet (a COMPLETING one included), as `id:STATE`."""
        result = self._run(["squeue", "--noheader", "--states=all", "--format=%i:%T"])
        return [job for job in result.stdout.split() if job.split(":")[1] not in TERMINAL_STATES]

    def _end_jobs(self, timeout_s: float) -> None:
        jobs = self._jobs()
        if not jobs:
            return
        self._run(["scancel", "--full", "--partition", self.partition])
        deadline = time.monotonic() + timeout_s
        while jobs and time.monotonic() < deadline:
            time.sleep(1.0)
            jobs = self._jobs()
        if jobs:
            raise LaunchError(f"job(s) {', '.join(jobs)} still running {timeout_s:.0f} s after scancel, so the cluster "
                              f"stays up; run `llaunch cluster down` again once `squeue` no longer lists them.")

    def sinfo(self) -> str:
        return self._run(["sinfo", "--Node", "--format=%10N %10P %8T %5c %8m"]).stdout

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.env(), capture_output=True, text=True, timeout=30)

    def _write_files(self) -> None:
        for sub in ("ctld", "run", "log", "munge", *(f"spool/{n}" for n in self.node_names)):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir / "munge", 0o700)
        template = string.Template(resources.files("cluster").joinpath("dev/slurm.conf").read_text())
        self.conf_path.write_text(template.substitute(
            state_dir=self.state_dir,
            hostname=socket.gethostname().split(".")[0],
            user=getpass.getuser(),
            ctld_port=self.ctld_port,
            node_prefix=self.node_prefix,
            nodes=self.nodes,
            slurmd_first_port=self.slurmd_first_port,
            slurmd_last_port=self.slurmd_first_port + self.nodes - 1,
            cpus=self.cpus_per_node,
            memory_mb=self.memory_mb,
            partition=self.partition,
        ))

    def _start_munged(self) -> None:
        munge = self.state_dir / "munge"
        if _pid_alive(munge / "munged.pid"):
            return
        key = munge / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
        argv = ["munged", f"--key-file={key}", f"--socket={munge / 'munge.socket'}",
                f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
                f"--seed-file={munge / 'munged.seed'}"]
        if os.geteuid() == 0:
            argv.append("--force")  # munged refuses root without it; CI containers are root
        self._start(argv, "munged", log=munge / "munged.log")

    def _start(self, argv: list[str], name: str, log: Path | None = None) -> None:
        """Start a daemon (each forks into the background itself) and fail with its log when it does not."""
        result = self._run(argv)
        if result.returncode != 0:
            log = log or self.state_dir / "log" / f"{name}.log"
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise LaunchError(
                f"{name} did not start ({detail[-1] if detail else 'no output'}); see {log}."
            )

    def _wait_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            result = self._run(["sinfo", "--noheader", "--Node", "--format=%N %T"])
            if result.returncode == 0:
                states = dict(line.split() for line in result.stdout.splitlines() if line.strip())
                ready = {"idle", "mixed", "allocated"}
                if set(states) >= set(self.node_names) and all(states[n] in ready for n in self.node_names):
                    return
            time.sleep(0.5)
        raise LaunchError(
            f"the local cluster's nodes did not become idle in {timeout_s:.0f} s (states: {states or 'unreachable'}); "
            f"see the logs in {self.state_dir / 'log'}."
        )


def slurm_env(local: bool) -> dict[str, str]:
    """The environment for SLURM commands: a local profile reaches the `llaunch cluster up` cluster unless
    SLURM_CONF already points somewhere."""
    env = dict(os.environ)
    if local and not SLURM_CONF.get(env):
        env[SLURM_CONF.name] = str(LocalCluster().conf_path)
    return env
