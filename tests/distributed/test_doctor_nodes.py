"""`llaunch doctor` with its all-reduce (a torch process per node): two nodes on loopback in threads, and the
command on this machine. The same on the real two-node cluster is tests/slurm/test_slurm_doctor.py."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

import pytest

from cluster.doctor.checks import OK
from cluster.doctor.node import NodeContext, NodeReport, results_path, run_node
from launcher.errors import EXIT_CHECK_FAILED

pytestmark = pytest.mark.dist


def test_two_nodes_on_loopback_name_the_node_with_another_version_and_neither_would_start(tmp_path):
    """One node's fault: it fails `software`; the other passes but learns through the all-reduce that it failed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    reports: dict[int, NodeReport] = {}
    env = {**os.environ, "LLAUNCH_DOCTOR_FAULT_VERSION": "1:deepspeed=0.0.1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}

    def node(index: int) -> None:
        ctx = NodeContext(tmp_path, index, ["n1", "n2"], ["127.0.0.1", "127.0.0.1"], port, job_id="7")
        reports[index] = run_node(ctx, env)

    threads = [threading.Thread(target=node, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    first, second = reports[0], reports[1]
    assert first.failed is None and first.peers_failed == 1
    assert second.failed.name == "software" and "deepspeed 0.0.1 here" in second.failed.sentence
    assert second.failure_sentence().startswith("doctor: software failed on n2: ")
    assert {c.name: c.status for c in second.checks}["storage"] == OK  # read the first node's nonce
    assert not list(tmp_path.glob(".llaunch-doctor-*"))  # nonce and write probes removed
    saved = json.loads(results_path(tmp_path, 1).read_text())
    assert NodeReport.from_dict(saved).failed.name == "software"


def test_doctor_command_exits_3_naming_node_and_check(tmp_path, monkeypatch, capsys):
    from launcher.cli import main

    monkeypatch.setenv("LLAUNCH_DOCTOR_FAULT_PORT", "1")
    monkeypatch.setenv("LLAUNCH_DOCTOR_FAULT_MIN_FREE_BYTES", str(2**62))
    assert main(["doctor", "--output-dir", str(tmp_path)]) == EXIT_CHECK_FAILED
    out = capsys.readouterr().out
    failed = {line.split()[1]: line for line in out.splitlines() if line.split()[2:3] == ["FAIL"]}
    assert set(failed) == {"rendezvous", "space", "allreduce"}, out  # the held port stops the all-reduce too
    assert "is taken on the first node" in failed["rendezvous"] and "free space" in failed["space"]
    assert "1 node(s) failed a check in " in out and "s (exit 3)." in out
    assert json.loads(results_path(tmp_path, 0).read_text())["checks"]
