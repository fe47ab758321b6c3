"""The real local SLURM cluster for tests/slurm, started by the same code as `llaunch cluster up`.

Without slurm-wlm the tests skip, unless LLAUNCH_REQUIRE_SLURM=1 (CI, after cluster/dev/install.sh), where a
missing SLURM is a failure. A cluster that was already up is left running; one started here is stopped.
"""

from __future__ import annotations

import os
import shutil

import pytest


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    if shutil.which("slurmctld") is None or shutil.which("munged") is None:
        message = "slurm-wlm and munge are not installed; run `bash cluster/dev/install.sh`"
        if os.environ.get("LLAUNCH_REQUIRE_SLURM") == "1":
            pytest.fail(message + " (LLAUNCH_REQUIRE_SLURM=1)")
        pytest.skip(message)
    from cluster.local import LocalCluster
    from launcher.cli import main

    cluster = LocalCluster()
    was_running = cluster.is_running()
    assert main(["cluster", "up"]) == 0
    saved = {key: os.environ.get(key) for key in ("SLURM_CONF", "LLAUNCH_HOME")}
    os.environ["SLURM_CONF"] = str(cluster.conf_path)
    os.environ["LLAUNCH_HOME"] = str(tmp_path_factory.mktemp("llaunch-home"))  # job records of this session
    yield cluster
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if not was_running:
        main(["cluster", "down"])
