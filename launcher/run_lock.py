"""One training process tree per run directory: an exclusive lock that names its holder.

`llaunch run` takes it before it touches DIR and keeps it while its ranks train; it tells them so through
HELD_BY_LAUNCHER_ENV. Ranks started any other way (a SLURM job, `python -m launcher.train`) take it on rank 0.
The lock is an flock, so the kernel drops it when the holder dies: a crashed run never blocks the next one.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import socket
from pathlib import Path

from launcher.errors import LaunchError

LOCK_FILE = ".llaunch.lock"
HELD_BY_LAUNCHER_ENV = "LLAUNCH_RUN_LOCK_HELD"  # the run directory whose lock the parent `llaunch run` holds


class RunLock:
    """Held while the object lives (its open file holds the flock); `release()` or exit drops it."""

    def __init__(self, handle):
        self._handle = handle

    @classmethod
    def acquire(cls, run_dir: str | Path) -> "RunLock":
        """Lock run_dir (creating it), or raise LaunchError naming the process that holds it."""
        run_dir = Path(run_dir)
        path = run_dir / LOCK_FILE
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+", encoding="utf-8")
        except OSError as err:
            raise LaunchError(f"cannot create {path} ({err.strerror or err}); choose a writable --output-dir.") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read(200).strip() or "another process"
            handle.close()
            raise LaunchError(f"{run_dir} is in use by {holder}; wait for that run to end (or stop it), or choose "
                              f"another --output-dir.") from None
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        handle.truncate(0)
        handle.write(f"llaunch pid {os.getpid()} on {socket.gethostname()} since {started}")
        handle.flush()
        return cls(handle)

    def release(self) -> None:
        self._handle.close()  # closing the file drops the flock
