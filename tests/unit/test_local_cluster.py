"""`llaunch cluster down` stops only the daemons it started, even when their pid files are stale."""

from __future__ import annotations

import subprocess
import sys

from cluster.local import LocalCluster


def test_cluster_down_never_signals_a_process_that_reused_a_stale_daemon_pid(tmp_path):
    # The system gave slurmd's old pid to an unrelated process (it happened: `cluster down` killed a torchrun).
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        cluster = LocalCluster(state_dir=tmp_path)
        for pid_file in cluster._pid_files().values():
            pid_file.parent.mkdir(parents=True, exist_ok=True)
            pid_file.write_text(f"{bystander.pid}\n")
        assert cluster.down() == []
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
