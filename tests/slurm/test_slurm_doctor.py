"""`llaunch doctor` on the real local two-node cluster: a healthy run passes, injected faults are named with
node, check and exit code within a minute, and a submitted job whose doctor fails never starts torchrun."""

from __future__ import annotations

import json
import os
import time

import pytest
from test_slurm_jobs import QUICKSTART, TINY, job_id_of, llaunch, logs_of, wait_until

from cluster.jobs import job_state, load_record
from launcher.observe.node_ledger import NodeLedger
from launcher.errors import EXIT_CHECK_FAILED

pytestmark = pytest.mark.slurm
LIMIT_S = 60


def doctor(tmp_path, **faults: str):
    saved = dict(os.environ)
    os.environ.update({f"LLAUNCH_DOCTOR_FAULT_{k.upper()}": v for k, v in faults.items()})
    try:
        start = time.monotonic()
        result = llaunch("doctor", "--nodes", "2", "--output-dir", str(tmp_path), timeout=LIMIT_S + 60)
        return result, time.monotonic() - start
    finally:
        os.environ.clear()
        os.environ.update(saved)


def line(result, host: str, check: str) -> str:
    return next(text for text in result.stdout.splitlines() if text.split()[:2] == [host, check])


def test_healthy_doctor_passes_on_two_nodes(slurm_cluster, tmp_path):
    result, seconds = doctor(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert seconds < LIMIT_S
    for host in ("n1", "n2"):
        for check in ("rendezvous", "storage", "software", "clock", "space", "allreduce"):
            assert line(result, host, check).split()[2] == "ok", result.stdout
    assert "all checks passed on 2 node(s)" in result.stdout
    assert (tmp_path / "doctor" / "node-0.json").exists() and (tmp_path / "doctor" / "node-1.json").exists()


def test_injected_faults_are_named_with_node_check_and_exit_code(slurm_cluster, tmp_path):
    result, seconds = doctor(tmp_path, version="1:torch=0.0.0", local_storage="1",
                             nvml='[{"remapped_rows_failed": true}]')
    assert result.returncode == EXIT_CHECK_FAILED, result.stdout + result.stderr
    assert seconds < LIMIT_S
    assert "torch 0.0.0 here but" in line(result, "n2", "software") and " FAIL " in line(result, "n2", "software")
    assert "does not see the file n1 wrote" in line(result, "n2", "storage")
    assert " ok " in line(result, "n1", "software")  # only the faulty node is named
    assert "GPU 0 failed a row remap" in line(result, "n1", "gpus") and " FAIL " in line(result, "n1", "gpus")
    assert "2 node(s) failed a check in " in result.stdout and "s (exit 3)." in result.stdout


def test_submitted_job_whose_doctor_fails_never_starts_torchrun(slurm_cluster, tmp_path, monkeypatch):
    # The failure is a hard event in the node ledger (LLAUNCH_HOME/ledger/local.jsonl), which quarantines n2:
    # a home of its own keeps it out of the other tests' submissions (a --min-nodes 1 job would then run on n1).
    monkeypatch.setenv("LLAUNCH_HOME", str(tmp_path / "home"))
    os.environ["LLAUNCH_DOCTOR_FAULT_VERSION"] = "1:torch=0.0.0"  # sbatch passes it to both nodes
    try:
        result = llaunch("submit", str(QUICKSTART), *TINY, "--nodes", "2", "--output-dir", str(tmp_path / "out"),
                         "--max-steps", "4")
    finally:
        del os.environ["LLAUNCH_DOCTOR_FAULT_VERSION"]
    job_id = job_id_of(result)
    env = load_record(job_id).env()
    state = wait_until(lambda: (s := job_state(job_id, env)).finished and s, 90, "the job to fail", job_id)
    assert state.state == "FAILED" and state.restarts == 0
    logs = logs_of(job_id) + llaunch("logs", job_id, "--rank", "1").stdout
    assert "launcher.runtime.torchrun" not in logs and "rank 0 of 2 starts" not in logs
    status = llaunch("status", job_id).stdout
    assert "error: doctor: software failed on n2: torch 0.0.0 here but" in status, status
    [event] = NodeLedger.for_profile("local").events()
    assert (event.kind, event.host, event.job_id) == ("doctor", "n2", job_id)
    # The next submission keeps n2 out, and --dry-run shows it (one node spared of two for a 1-node job).
    dry = llaunch("submit", str(QUICKSTART), *TINY, "--nodes", "1", "--output-dir", str(tmp_path / "next"), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "#SBATCH --exclude=n2" in dry.stdout and "# keeping n2 out of this job (node ledger " in dry.stdout


def test_a_doctor_failure_that_is_the_jobs_blames_no_node(slurm_cluster, tmp_path, monkeypatch):
    """The rendezvous port taken on the first node (which fails every node's all-reduce too) and too little
    space on the shared dir: the job fails with the doctor's sentence; a job cancelled while its doctor runs
    ends; the node ledger stays empty."""
    monkeypatch.setenv("LLAUNCH_HOME", str(tmp_path / "home"))
    faults = {"LLAUNCH_DOCTOR_FAULT_PORT": "1", "LLAUNCH_DOCTOR_FAULT_MIN_FREE_BYTES": str(10**18)}
    result = llaunch("submit", str(QUICKSTART), *TINY, "--nodes", "2", "--output-dir", str(tmp_path / "out"),
                     "--max-steps", "4", env=faults)
    job_id = job_id_of(result)
    env = load_record(job_id).env()
    state = wait_until(lambda: (s := job_state(job_id, env)).finished and s, 120, "the job to fail", job_id)
    assert state.state == "FAILED" and state.restarts == 0
    status = llaunch("status", job_id).stdout
    assert "error: doctor: rendezvous failed on n1: port " in status or "error: doctor: space failed on " in status, status
    logs = logs_of(job_id) + llaunch("logs", job_id, "--rank", "1").stdout
    assert "space       FAIL" in logs and "allreduce   FAIL" in logs, logs[-3000:]
    goodput = json.loads(llaunch("goodput", job_id, "--json").stdout)  # the attempt that ended in its doctor
    assert [inc["cause"] for inc in goodput["incarnations"]] == ["doctor"], goodput["incarnations"]
    # `llaunch cancel` while the doctor's checks run (held there by the taken port's all-reduce timeout): what
    # fails during a cancel may be the cancel's doing, so no node is blamed (not even for n2's software).
    faults = {"LLAUNCH_DOCTOR_FAULT_PORT": "1", "LLAUNCH_DOCTOR_FAULT_VERSION": "1:torch=0.0.0"}
    cancelled = job_id_of(llaunch("submit", str(QUICKSTART), *TINY, "--nodes", "2", "--output-dir",
                                  str(tmp_path / "cancelled"), "--max-steps", "4", env=faults))
    # a cancel before the node task holds its handlers would end it unheard: wait for its first line
    wait_until(lambda: "[llaunch] attempt 1" in logs_of(cancelled), 60, "the node task to start", cancelled)
    assert llaunch("cancel", cancelled).returncode == 0
    state = wait_until(lambda: (s := job_state(cancelled, env)).finished and s, 90, "the job to end", cancelled)
    logs = logs_of(cancelled) + llaunch("logs", cancelled, "--rank", "1").stdout
    assert state.state == "CANCELLED" and "stopped by SIGTERM during the doctor's checks" in logs, logs[-3000:]
    assert NodeLedger.for_profile("local").events() == []
