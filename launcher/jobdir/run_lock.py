"""One training process tree per run directory: a lock on DIR/.llaunch.lock that names its holders.

`llaunch run` takes it before it touches DIR and tells its ranks so through launcher.env.RUN_LOCK_HELD; ranks started
any other way (a SLURM job, `python -m launcher.train`) take it on rank 0. Then every other rank joins it.

It is an flock, so the kernel drops it when its holders die: a crashed run never blocks the next one. A run
takes it exclusively (refused while anyone holds it), writes its line, and turns it into a shared lock, which
its ranks join, each on its own open file: so it is held while the launcher *or any rank* of the run lives,
and a rerun is refused until the last of them is gone. Each process holds it on a descriptor of its own,
never an inherited one: an flock belongs to the open file description, which any child the holder forks
shares, so an inherited lock would live as long as the longest-lived child of anyone who had it.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import os
import socket
from pathlib import Path

from launcher.errors import LaunchError
from launcher.jobdir.layout import JobDir



class RunLock:
    """Held while the object lives (its open file holds the flock); `release()` or exit drops it."""

    def __init__(self, fd: int):
        self._fd = fd

    @classmethod
    def acquire(cls, run_dir: str | Path) -> "RunLock":
        """Lock run_dir for a new run (creating it), or raise LaunchError naming who holds it."""
        run_dir = Path(run_dir)
        fd = _open(run_dir, create_dir=True)
        _flock(fd, run_dir, fcntl.LOCK_EX)
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        os.ftruncate(fd, 0)
        os.write(fd, f"llaunch pid {os.getpid()} on {socket.gethostname()} since {started}\n".encode())
        # Shared from now on, so the run's ranks can join. Linux converts by unlocking first: a run that took
        # the lock in that instant is the one that goes on, and this one is refused.
        _flock(fd, run_dir, fcntl.LOCK_SH)
        return cls(fd)

    @classmethod
    def join(cls, run_dir: str | Path, rank: int) -> "RunLock":
        """A rank of the run that holds run_dir's lock holds it too, so a rerun is refused while this rank lives."""
        run_dir = Path(run_dir)
        fd = _open(run_dir, create_dir=False)
        _flock(fd, run_dir, fcntl.LOCK_SH)
        os.write(fd, f"rank {rank} pid {os.getpid()} on {socket.gethostname()}\n".encode())
        return cls(fd)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the file drops the flock
            self._fd = -1


def _open(run_dir: Path, create_dir: bool) -> int:
    """The lock file, never through a symbolic link (which would make the run write into the link's target)."""
    path = JobDir(run_dir).lock
    try:
        if create_dir:
            run_dir.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise LaunchError(f"{path} is a symbolic link, and llaunch locks only a file of its own there (the "
                              f"link and its target were left alone); remove the link, or choose another "
                              f"--output-dir.") from None
        raise LaunchError(f"cannot create {path} ({err.strerror or err}); choose a writable --output-dir.") from None


def _flock(fd: int, run_dir: Path, how: int) -> None:
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except BlockingIOError:
        holders = os.pread(fd, 4096, 0).decode(errors="replace").splitlines()
        os.close(fd)
        ranks = [line.split()[3] for line in holders[1:] if line.startswith("rank ") and len(line.split()) > 3]
        holder = (holders[0].strip() if holders else "") or "another process"
        if ranks:
            holder += f" (its ranks: pid {', '.join(ranks)})"
        raise LaunchError(f"{run_dir} is in use by {holder}; wait for that run to end (or stop it), or choose "
                          f"another --output-dir.") from None
