"""Writing a small file so that a reader (a rank, `llaunch status`, a user's next command) never sees half of it."""

from __future__ import annotations

import os
from pathlib import Path

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
