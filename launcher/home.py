"""LLAUNCH_HOME (default ~/.llaunch): what outlives a run, per user: the job records of `llaunch submit` (jobs/),
the cluster's earlier jobs (history/) and the node ledgers (ledger/). Launcher side; cluster/ reads it from here."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "LLAUNCH_HOME"


def llaunch_home() -> Path:
    return Path(os.environ.get(HOME_ENV, Path.home() / ".llaunch"))
