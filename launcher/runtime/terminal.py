"""Output that outlives its terminal. `llaunch run`, torchrun's agent and every rank write to the terminal the
run was started from; when it closes (a window closed, an ssh session dropped) the kernel hangs it up: SIGHUP
(handled like SIGTERM: save and stop, launcher.runtime.signals) and, from then on, every write to it fails with
EIO (EPIPE for a pipe whose reader left). A print that raised then would end a rank in the middle of its stop
checkpoint, or the launcher before it reports. So each of these processes writes through `TerminalSafeStream`:
the first write that fails so points the descriptor at /dev/null (what Python's documentation advises for
EPIPE, docs.python.org/3/library/signal.html#note-on-sigpipe), which silences that write, every later one and
the C++ libraries' writes to the same descriptor alike; any other error is raised as before. Torch-free."""

from __future__ import annotations

import errno
import os
import sys

TERMINAL_GONE = (errno.EIO, errno.EPIPE)


class TerminalSafeStream:
    """sys.stdout or sys.stderr, unchanged but for a write or flush to a terminal that is gone."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as err:
            self._gone(err)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as err:
            self._gone(err)

    def _gone(self, err: OSError) -> None:
        if err.errno not in TERMINAL_GONE:
            raise err
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, self._stream.fileno())  # what the stream still buffers goes there at its next flush
        finally:
            os.close(null)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def outlive_the_terminal() -> None:
    """Write sys.stdout and sys.stderr through TerminalSafeStream from now on; call it before anything keeps a
    reference to either (a logging handler, a progress bar)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, TerminalSafeStream):
            setattr(sys, name, TerminalSafeStream(stream))
