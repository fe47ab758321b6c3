"""Pure builders for what goes to SLURM: submitit's parameters, the sbatch script, and each node's torchrun command.

Nothing here touches the cluster, so `llaunch submit --dry-run` and the golden tests see exactly the text
that `llaunch submit` hands to sbatch. Every value from a config or the command line reaches the script
either sanitized (the job name) or shell-quoted (paths, partition, account, ...), and a value with a line
break is refused: `#SBATCH` lines are comments, so a newline would start a line of shell.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from submitit.core.utils import JobPaths

from cluster.profile import APPTAINER, PYXIS, ClusterProfile, Container
from launcher.env import CACHE, DIST_TIMEOUT_S, PYTHONPATH
from launcher.errors import LaunchError
from launcher.planning.plan import Plan

RDZV_PORT_BASE = 20000
RDZV_PORT_SPAN = 10000  # ports 20000-29999: below Linux's ephemeral range, clear of SLURM's 6817/6818
ARRAY_TASK_PORT_STRIDE = 8  # room for the ports of array tasks of up to 7 nodes on one host
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
LLAUNCH_SOURCE = str(Path(__file__).resolve().parents[1])  # the folder holding launcher/ and cluster/


def job_name(text: str) -> str:
    """A SLURM job name with only [A-Za-z0-9._-]: readable in squeue and inert in any shell."""
    name = re.sub(r"-{2,}", "-", _UNSAFE_NAME.sub("-", str(text))).strip("-.")[:64]
    return name or "llaunch"


def _single_line(label: str, value: str) -> str:
    if any(ch in str(value) for ch in "\n\r\0"):
        raise LaunchError(f"{label} {value!r} contains a line break; use a value on one line.")
    return str(value)


def rendezvous_port(job_id: str | int) -> int:
    """The c10d port for one job: derived from the job id so two jobs sharing a first node do not collide. A job
    takes this port and the doctor's one per node after it (cluster.doctor.exchange.doctor_port); the tasks of a
    job array (`ARRAY_TASK`: a sweep's elements, which share a first node when they are smaller than a node, or
    on the local cluster, whose nodes are one host) start ARRAY_TASK_PORT_STRIDE apart."""
    array_id, _, task = str(job_id).partition("_")
    return RDZV_PORT_BASE + (int(array_id) + int(task or 0) * ARRAY_TASK_PORT_STRIDE) % RDZV_PORT_SPAN


@dataclass(frozen=True)
class ContainerJob:
    """A profile's container for one job. Besides the profile's mounts every node needs, each at the same path
    inside as outside (config.yaml and plan.yaml name them so): the job dir (plan, checkpoints, logs and
    beacons, written by the ranks), llaunch's own source (the node task and the ranks import it from there, as
    the image has only its requirements; read-only) and the token cache (tokenized once, read by every rank).

    pyxis (github.com/NVIDIA/pyxis/wiki/Usage) runs the whole srun step in the image: `--container-image=IMAGE`,
    `--container-mounts=SRC:DST[:FLAGS][,SRC:DST...]`, `--container-workdir=PATH`; the step's environment
    (the script's exports) goes in with it. Apptainer wraps each node's torchrun: `apptainer exec [--nv]
    [--bind SRC:DST[:ro]]... [--pwd DIR] [--env NAME=VALUE]... IMAGE CMD` (apptainer.org/docs/user/latest:
    cli/apptainer_exec, bind_paths_and_mounts, environment_and_metadata); --nv makes the host's GPUs visible."""

    container: Container
    job_dir: str
    cache_dir: str
    source: str = LLAUNCH_SOURCE
    pythonpath: str = ""  # what the image's python imports first (the job's frozen code); "": source

    @property
    def binds(self) -> list[str]:
        own = [f"{self.job_dir}:{self.job_dir}", f"{self.source}:{self.source}:ro", f"{self.cache_dir}:{self.cache_dir}"]
        return own + list(self.container.mounts)

    @property
    def env(self) -> dict[str, str]:
        return {PYTHONPATH.name: self.pythonpath or self.source, CACHE.name: self.cache_dir}

    @property
    def runs_srun_step(self) -> bool:
        return self.container.runtime == PYXIS

    def srun_args(self) -> list[str]:
        """pyxis's flags for the srun line."""
        workdir = [f"--container-workdir={self.container.workdir}"] if self.container.workdir else []
        return [f"--container-image={self.container.image}", f"--container-mounts={','.join(self.binds)}", *workdir]

    def exports(self) -> list[str]:
        """The script's line that points the image's python at llaunch's source and the cache (pyxis)."""
        return ["export " + " ".join(f"{key}={shlex.quote(value)}" for key, value in sorted(self.env.items()))]

    def wrap(self, gpus: bool) -> list[str]:
        """What goes before torchrun's python on a node (apptainer); empty when pyxis runs the whole step."""
        if self.container.runtime != APPTAINER:
            return []
        argv = ["apptainer", "exec", *(["--nv"] if gpus else [])]
        argv += [word for bind in self.binds for word in ("--bind", bind)]
        argv += ["--pwd", self.container.workdir] if self.container.workdir else []
        argv += [word for key, value in sorted(self.env.items()) for word in ("--env", f"{key}={value}")]
        return argv + [self.container.image]


def slurm_parameters(profile: ClusterProfile, name: str, container: ContainerJob | None = None) -> dict:
    """submitit SlurmExecutor parameters: one task per node (that task runs torchrun), requeue allowed; a pyxis
    container's flags on the srun line."""
    params: dict = {
        "job_name": job_name(name),
        "nodes": profile.allocation_nodes,
        "ntasks_per_node": 1,
        "cpus_per_task": profile.cpus_per_task,
        "time": profile.time_minutes,
        "signal_delay_s": profile.signal_delay_s,
        # A node whose task fails takes the others down at once instead of leaving them in a collective.
        "srun_args": ["--kill-on-bad-exit=1"],
        "additional_parameters": {"requeue": True},
    }
    if profile.min_nodes is not None and profile.min_nodes < profile.nodes:
        # SLURM 22.05 gives a range with --ntasks-per-node the fewest nodes, without it as many as are free: the
        # one task per node is asked of srun instead. submitit's own `nodes` stays the number of its tasks.
        params["additional_parameters"]["nodes"] = f"{profile.min_nodes}-{profile.nodes}"
        del params["ntasks_per_node"]
        params["srun_args"].append("--ntasks-per-node=1")
    if profile.restarts_on_spares:  # the step runs on --nodes of the allocation; the spares wait (cluster.restart)
        params["srun_args"] += [f"--nodes={profile.nodes}", f"--ntasks={profile.nodes}"]
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(profile, key)
        if value:
            params[key] = _single_line(key, value)
    if profile.gpus_per_node:
        params["gpus_per_node"] = profile.gpus_per_node
    if profile.mem_gb:
        params["mem"] = f"{int(profile.mem_gb)}GB" if profile.mem_gb == int(profile.mem_gb) else f"{int(profile.mem_gb * 1024)}MB"
    if profile.setup:
        params["setup"] = [_single_line("setup line", line) for line in profile.setup]
    if container is not None and container.runs_srun_step:
        params["srun_args"] += container.srun_args()
        params["setup"] = params.get("setup", []) + container.exports()
    return params


def training_parameters(profile: ClusterProfile, name: str, folder: str | Path, host_python: str,
                        container: ContainerJob | None = None) -> dict:
    """A training job's parameters: slurm_parameters and, after srun, the teardown of `teardown_lines` (with
    spare nodes, `restart_lines`' loop of steps)."""
    params = slurm_parameters(profile, name, container)
    if profile.restarts_on_spares:
        params["teardown"] = restart_lines(host_python, folder, params["srun_args"],
                                           step_python(container, host_python))
    else:
        params["teardown"] = teardown_lines(host_python, folder)
    return params


def teardown_lines(host_python: str, folder: str | Path) -> list[str]:
    """What submitit's script runs after srun on the batch host (outside any container): a step that failed
    goes to cluster.teardown, which decides for an attempt whose first node's task was killed before it could;
    the script still ends with the step's status, so a failed job stays FAILED."""
    run = f"{shlex.quote(host_python)} -u -m cluster.teardown {shlex.quote(_single_line('log folder', str(folder)))}"
    return ["llaunch_step_status=$?", f'[ "$llaunch_step_status" -eq 0 ] || {run} "$llaunch_step_status"',
            'exit "$llaunch_step_status"']


def restart_lines(host_python: str, folder: str | Path, srun_args: list[str], python: str) -> list[str]:
    """With spare nodes, what the script runs after srun on the batch host: cluster.teardown decides after every
    step (as teardown_lines' does after a failed one) and, when the job restarts inside its allocation, prints
    the new step's node choice (--exclude of the failed hosts), for which the loop runs submitit's srun line
    again (its output appended to the same per-task logs); the script ends with the last step's status."""
    folder = _single_line("log folder", str(folder))
    paths = JobPaths(folder=folder)
    srun = shlex.join(["srun", "--unbuffered", "--open-mode=append", "--output", str(paths.stdout), "--error",
                       str(paths.stderr), *srun_args])
    decide = f"{shlex.quote(host_python)} -u -m cluster.teardown --next-step {shlex.quote(folder)} \"$llaunch_step_status\""
    return ["llaunch_step_status=$?",
            f"while llaunch_step_nodes=$({decide}); do",
            f"    {srun} $llaunch_step_nodes {submitit_command(python, folder)}",
            "    llaunch_step_status=$?",
            "done",
            'exit "$llaunch_step_status"']


def step_python(container: ContainerJob | None, host_python: str) -> str:
    """The interpreter srun starts the node task with: the image's when pyxis runs the step in it."""
    return container.container.python if container is not None and container.runs_srun_step else host_python


def submitit_command(python: str, folder: str | Path) -> str:
    """The command submitit puts after srun (same text as SlurmExecutor._submitit_command_str)."""
    return " ".join([shlex.quote(python), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def render_sbatch(params: dict, folder: str | Path, python: str) -> str:
    """The sbatch script submitit will write for these parameters (its own renderer, so it cannot drift)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = _single_line("log folder", str(folder))
    return _make_sbatch_string(command=submitit_command(python, folder), folder=folder, **params)


def node_command(
    plan: Plan,
    job_dir: str | Path,
    *,
    rdzv_host: str,
    rdzv_port: int | str,
    job_id: str,
    max_restarts: int,
    dist_timeout_s: int,
    cpus_per_node: int | None = None,
    python: str = "python",
    wrap: tuple[str, ...] | list[str] = (),
) -> tuple[list[str], dict[str, str]]:
    """What one node's task runs: torchrun for all of the plan's nodes, rendezvous on the first node.

    The extra environment makes a lost peer fail the job within dist_timeout_s instead of hanging until
    the time limit: NCCL's watchdog aborts a stuck collective, and the training entrypoint passes
    launcher.env.DIST_TIMEOUT_S to init_process_group (which is what bounds gloo). `wrap` (ContainerJob.wrap)
    goes before `python`, the image's then.
    """
    from launcher.runtime.torchrun import build_torchrun_argv

    argv, env = build_torchrun_argv(
        plan,
        Path(job_dir),
        nnodes=plan.nodes,
        rdzv_endpoint=f"{rdzv_host}:{rdzv_port}",
        rdzv_id=str(job_id),
        max_restarts=max_restarts,
        python=python,
        cpus_per_node=cpus_per_node,
    )
    argv = [*wrap, *argv]
    env = dict(env)
    env.update({
        DIST_TIMEOUT_S.name: str(dist_timeout_s),
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": str(dist_timeout_s),
    })
    return argv, env


def render_node_command(argv: list[str], env: dict[str, str]) -> str:
    """A node's command as one shell line (for --dry-run): the environment it adds, then torchrun."""
    exports = [f"{key}={shlex.quote(value)}" for key, value in sorted(env.items())]
    return " ".join(exports + [shlex.join(argv)])
