"""Joining the job's process group: the one place a rank learns its device, rank and world."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from launcher import env
from launcher.errors import LaunchError


def collective_timeout(environ) -> datetime.timedelta | None:
    """The launcher passes the job's collective timeout (launcher.env.DIST_TIMEOUT_S) so that a collective waiting
    on a lost node fails the job in minutes (torch's default is 10 min for NCCL, 30 for gloo); None: torch's."""
    seconds = env.dist_timeout_s(environ)
    return None if seconds is None else datetime.timedelta(seconds=seconds)


def init_distributed(host_collectives: bool = False) -> tuple[torch.device, int, int]:
    """Join torchrun's process group (NCCL on GPU, gloo on CPU); a bare `python -m` run is a world of one.
    host_collectives: gloo for CPU tensors beside NCCL (FSDP2 CPU offload reduces norms of host shards)."""
    if dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        return device, dist.get_rank(), dist.get_world_size()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ["LOCAL_RANK"])
    group_kwargs = {"timeout": timeout} if (timeout := collective_timeout(os.environ)) else {}
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl" if host_collectives else "nccl"
        dist.init_process_group(backend, device_id=device, **group_kwargs)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", **group_kwargs)
    return device, dist.get_rank(), dist.get_world_size()


def on_every_rank(take, world_size: int):
    """take() on this rank (a lock: None or something with release()); a LaunchError on any rank is raised on
    every rank, so none waits for the others in a collective, and what this rank took is given back."""
    result, error = None, ""
    try:
        result = take()
    except LaunchError as err:
        error = str(err)
    errors = [""] * world_size
    dist.all_gather_object(errors, error)
    if any(errors):
        if result is not None:
            result.release()
        raise LaunchError(next(filter(None, errors)))
    return result


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
