"""Suite-wide: OpenMP threads that sleep while they wait, GPU tests skip without CUDA (everything else runs on CPU),
with LLAUNCH_HOME in a temporary folder; `slurm_node` is a SLURM node task without SLURM; and the order and units
of work that `make test` hands its two pytest-xdist workers (`-n 2`)."""

import os
import signal
import socket
from types import SimpleNamespace

# Two test workers share the machine's cores, so a rank or a worker with more than one OpenMP thread (a
# one-rank `llaunch run` takes every core, as does torch in this process) often waits for a sibling thread that
# has no core. libgomp's default policy spins while it waits: measured on 2 busy cores, 30 steps of a one-rank
# run cost 32 CPU-s spinning and 3.6 CPU-s with idle threads asleep, at the same losses. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

from launcher.runtime.signals import STOP_SIGNALS

# Longest tiers first: the many short unit files fill the gaps at the end of a run on two workers.
TIER_ORDER = ("slurm", "distributed", "e2e", "bench", "gpu", "unit")


def tier_rank(item) -> int:
    name = item.path.parent.name
    return TIER_ORDER.index(name) if name in TIER_ORDER else len(TIER_ORDER)


def pytest_collection_modifyitems(config, items):
    import torch

    items.sort(key=tier_rank)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (run on the lent GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True, scope="session")
def llaunch_home(tmp_path_factory):
    """The suite's job records and node ledgers in a folder of its own, never the user's ~/.llaunch (`llaunch run`
    records its stragglers and hangs in the local profile's node ledger)."""
    saved = os.environ.get("LLAUNCH_HOME")
    os.environ["LLAUNCH_HOME"] = str(tmp_path_factory.mktemp("llaunch-home"))
    yield
    if saved is None:
        os.environ.pop("LLAUNCH_HOME", None)
    else:
        os.environ["LLAUNCH_HOME"] = saved


@pytest.fixture(autouse=True)
def stop_handlers_restored():
    """The node runtime installs its own stop-signal handlers and leaves them ignored as it ends (`llaunch run` run
    in-process, a SLURM node task); every test's are put back afterwards, so none sees another's, whichever
    order a test worker runs the files in."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, *STOP_SIGNALS)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


class FakeSlurmNode:
    """Makes cluster.executor.NodeTask's as srun would run them on a one-node allocation of job 77 on `host`,
    in this process: the job environment, the node list and the queue times are stand-ins, submitit's requeue
    handler (what it does after `scontrol requeue`) raises SystemExit, and the hosts a requeue would exclude
    are collected in `excluded` (a host can be spared when the job may run on one node)."""

    def __init__(self, monkeypatch):
        from cluster import executor

        self.executor, self.monkeypatch, self.excluded = executor, monkeypatch, []
        monkeypatch.setattr(executor, "node_address", lambda node: "127.0.0.1")
        monkeypatch.setattr(executor, "node_can_be_spared", lambda host, job_id, min_nodes: min_nodes == 1)
        monkeypatch.setattr(executor, "exclude_from_requeued_job", lambda job_id, hosts: self.excluded.append((job_id, hosts)))
        monkeypatch.setattr(executor.job_events, "queue_times", lambda job_id: {})

        def submitit_requeue(signum, frame):
            raise SystemExit(-1)

        signal.signal(signal.SIGUSR2, submitit_requeue)

    def __call__(self, job_dir, command: list[str] | None = None, host: str = "h0", watchdog: dict | None = None,
                 **fields):
        """The task for `job_dir` with NodeTask's `fields` (the doctor off unless asked for). `command`: the
        stand-in torchrun's argv (the plan then a stand-in too, and the job's config.yaml one with `watchdog` as
        its supervision.watchdog settings, as `llaunch submit` folds them); None: the real torchrun of the job
        dir's plan, its rendezvous on a free local port."""
        from launcher.config import SupervisionSection, TrainConfig
        from launcher.jobdir.layout import JobDir

        executor, monkeypatch = self.executor, self.monkeypatch
        monkeypatch.setenv("SLURM_JOB_NODELIST", host)
        monkeypatch.setenv("SLURMD_NODENAME", host)
        monkeypatch.setattr(executor.submitit, "JobEnvironment",
                            lambda: SimpleNamespace(job_id="77", node=0, hostname=host, global_rank=0))
        monkeypatch.setattr(executor, "node_hostnames", lambda nodelist: [host])
        if command is not None:
            TrainConfig(supervision=SupervisionSection(watchdog=watchdog or {})).save(JobDir(job_dir).config)
            monkeypatch.setattr(executor.Plan, "load", lambda path: SimpleNamespace(device="cpu"))
            monkeypatch.setattr(executor, "check_allocation", lambda plan, hosts, gpus, min_nodes: plan)
            monkeypatch.setattr(executor, "node_command", lambda *a, **k: (list(command), {}))
        else:
            port = _free_port()
            monkeypatch.setattr(executor, "rendezvous_port", lambda job_id: port)
        return executor.NodeTask(str(job_dir), **{"max_restarts": 0, "dist_timeout_s": 60, "doctor": False, **fields})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def slurm_node(monkeypatch, stop_handlers_restored) -> FakeSlurmNode:
    return FakeSlurmNode(monkeypatch)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """One unit of work per test file, so that a module-scoped run trains once on one worker; tests/slurm is a
    single unit, as its files share the one local cluster (and `cluster down` stops it). Units go out in
    collection order."""
    from xdist.scheduler import LoadScopeScheduling

    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "tests/slurm" if path.startswith("tests/slurm/") else path

    config.option.loadscopereorder = False
    return FileScheduling(config, log)
