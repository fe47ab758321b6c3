"""`llaunch doctor` with its all-reduce (a torch process per node): two nodes on loopback in threads, and the
command on this machine. The same on the real two-node cluster is tests/slurm/test_slurm_doctor.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cluster.doctor.checks import FAIL, OK
from cluster.doctor.node import ALLREDUCE_TIMEOUT_S, NodeContext, NodeReport, results_path, run_node
from launcher.errors import EXIT_CHECK_FAILED

pytestmark = pytest.mark.dist


ROOT = str(Path(__file__).resolve().parents[2])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_nodes(job_dir: Path, faults: dict[str, str]) -> dict[int, NodeReport]:
    """Both nodes' doctor, each in a thread, on loopback; their reports by node index."""
    port, reports = _free_port(), {}
    env = {**os.environ, **faults, "PYTHONPATH": ROOT}

    def node(index: int) -> None:
        ctx = NodeContext(job_dir, index, ["n1", "n2"], ["127.0.0.1", "127.0.0.1"], port, job_id="7")
        reports[index] = run_node(ctx, env)

    threads = [threading.Thread(target=node, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return reports


def test_two_nodes_on_loopback_name_the_node_with_another_version_and_neither_would_start(tmp_path):
    """One node's fault: it fails `software`; the other passes but learns through the all-reduce that it failed."""
    reports = _two_nodes(tmp_path, {"LLAUNCH_DOCTOR_FAULT_VERSION": "1:deepspeed=0.0.1"})
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


def test_a_node_that_reaches_the_all_reduce_later_than_its_timeout_still_passes_it(tmp_path):
    """Nodes arrive seconds apart on a loaded cluster: arrival has its own wait, the timeout times the collective."""
    late = ALLREDUCE_TIMEOUT_S + 2
    reports = _two_nodes(tmp_path, {"LLAUNCH_DOCTOR_FAULT_LATE": f"1:{late}"})
    for report in reports.values():
        allreduce = {c.name: c for c in report.checks}["allreduce"]
        assert allreduce.status == OK, allreduce.sentence
        assert report.failed is None and report.peers_failed == 0


def test_a_node_that_never_arrives_is_named_by_the_first(tmp_path):
    """Only the first node runs: after the arrival wait it names the absent one, and does not blame the network."""
    from cluster.doctor import checks

    argv = [sys.executable, "-m", "cluster.doctor.allreduce", "127.0.0.1", str(_free_port()), "0", "2", "2", "8", "0"]
    start = time.monotonic()
    done = subprocess.run(argv, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=60)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["absent_peers"] == [1] and time.monotonic() - start < 30, result
    check = checks.allreduce(result, 0, ["n1", "n2"])
    assert check.status == FAIL and check.sentence.startswith("n2 did not reach the all-reduce (not arrived in 2 s)")
