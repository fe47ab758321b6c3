"""Files so that no one sees half of one: a small file written whole (a rank, `llaunch status`, a user's next
command read it), and the one reader of append-only JSON-lines files (the event ledger, the node ledger, the
ranks' metrics), which skips a line still being written and a damaged one."""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

from launcher.errors import LaunchError


def check_file_target(path: Path, what: str) -> None:
    """Refuse, before anything is written, a file target that is a directory or lies under a file."""
    if path.is_dir():
        raise LaunchError(f"{what} {path} is a directory; name a file.")
    under = next((p for p in path.absolute().parents if p.exists()), None)
    if under is not None and not under.is_dir():
        raise LaunchError(f"{what} {path} lies under the file {under}; choose another path.")
    if under is not None and not os.access(under, os.W_OK):
        raise LaunchError(f"{what} {path} cannot be written: {under} is read-only; choose another path.")


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write beside `path`, flush to disk, then rename over it: the file is either the old or the new one.

    A failed write (full disk, read-only directory, a file where a directory should be) removes its
    temporary file and is one sentence.
    """
    write_files_atomic({Path(path): text.encode("utf-8")})
    return Path(path)


def write_files_atomic(contents: dict[Path, bytes]) -> None:
    """Write every file beside its target first, and rename them into place only once all are on disk, so a
    failure leaves every target as it was (and no temporary file behind)."""
    written: list[Path] = []
    current = next(iter(contents))
    try:
        for current, data in contents.items():
            current.parent.mkdir(parents=True, exist_ok=True)
            tmp = current.with_name(current.name + ".tmp")
            written.append(tmp)
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        for current, tmp in zip(contents, written):
            tmp.replace(current)
    except OSError as err:
        for tmp in written:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
        raise LaunchError(f"cannot write {current} ({err.strerror or err}); free space, fix permissions or "
                          f"choose another path.") from None


Record = TypeVar("Record")


def read_records(path: Path, check: Callable[[object], Record]) -> list[Record]:
    """The records of an append-only JSON-lines file (this ledger, the node ledger): each line through `check`,
    which raises ValueError to say what is wrong with it. A damaged line is skipped and the skipped lines are
    named in one warning; a last line without its newline is a write still under way (or torn by a kill, which
    the next append closes) and is skipped silently. No file: no records. LaunchError when the path is not a
    regular file (a FIFO would block the reader forever) or cannot be read."""
    handle = open_regular(path)
    if handle is None:
        return []
    with handle:
        try:
            records, damaged, reasons = _parse_lines(handle, check)
        except OSError as err:
            raise LaunchError(f"cannot read {path} ({err.strerror or err}); move it away.") from None
    if damaged:
        more = "; ..." if damaged > len(reasons) else ""
        print(f"llaunch: warning: skipped {damaged} damaged line(s) of {path} ({'; '.join(reasons)}{more})",
              file=sys.stderr, flush=True)
    return records


def open_regular(path: Path) -> BinaryIO | None:
    """`path` open for reading, or None when it does not exist; LaunchError when it cannot be opened or is not a
    regular file (a FIFO would block its reader forever, a directory is no list of lines)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:  # ValueError: a NUL in the path
        raise LaunchError(f"cannot read {path} ({getattr(err, 'strerror', None) or err}); move it away or fix "
                          f"its permissions.") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LaunchError(f"{path} is not a regular file; move it away (llaunch keeps a plain file there).")
    return os.fdopen(fd, "rb")


def _parse_lines(lines, check: Callable[[object], Record]) -> tuple[list[Record], int, list[str]]:
    """The records of the complete lines, how many lines were damaged and what is wrong with the first three."""
    records, damaged, reasons = [], 0, []
    for number, line in enumerate(lines, 1):
        if not line.strip() or not line.endswith(b"\n"):
            continue
        try:
            records.append(check(json.loads(line)))
        except (ValueError, RecursionError) as err:  # not UTF-8, not JSON (or nested too deep), not a record
            damaged += 1
            if len(reasons) < 3:
                reasons.append(f"line {number}: {_reason(err)}")
    return records, damaged, reasons


def _reason(err: Exception) -> str:
    if isinstance(err, UnicodeDecodeError):
        return "not UTF-8"
    if isinstance(err, (json.JSONDecodeError, RecursionError)):
        return "not JSON"
    return str(err)
