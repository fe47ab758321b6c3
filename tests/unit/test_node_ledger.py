"""Node ledger and quarantine policy: one hard or two soft events within the window, expiry, the spare
limit, and an append-only file that survives a torn last line."""

from __future__ import annotations

import sys

import pytest

from launcher.observe.node_ledger import NodeEvent, NodeLedger, QuarantinePolicy, exclude_for_next_submission, quarantined
from launcher.errors import LaunchError

DAY = 24 * 3600.0
NOW = 1_000 * DAY
POLICY = QuarantinePolicy(window_s=7 * DAY, hard_events=1, soft_events=2)


def ev(host, kind, days_ago=0.0):
    return NodeEvent(host=host, kind=kind, time=NOW - days_ago * DAY)


def test_one_hard_or_two_soft_events_quarantine_a_host():
    events = [ev("a", "hang"), ev("b", "straggler"), ev("c", "straggler"), ev("c", "rank_failed", 1)]
    assert quarantined(events, POLICY, NOW) == ["a", "c"]


def test_events_expire_after_the_window():
    events = [ev("a", "hang", days_ago=8), ev("b", "straggler", 8), ev("b", "straggler", 1)]
    assert quarantined(events, POLICY, NOW) == []
    assert quarantined(events, QuarantinePolicy(window_s=10 * DAY), NOW) == ["a", "b"]


def test_never_more_excluded_than_the_partition_can_spare_worst_first():
    events = [ev("n1", "straggler"), ev("n1", "straggler"), ev("n2", "hang", 2), ev("n3", "xid", 1),
              ev("n3", "straggler"), ev("elsewhere", "hang")]
    partition = ["n1", "n2", "n3", "n4"]
    assert exclude_for_next_submission(events, POLICY, partition, nodes_needed=1, now=NOW) == ["n3", "n2", "n1"]
    assert exclude_for_next_submission(events, POLICY, partition, nodes_needed=2, now=NOW) == ["n3", "n2"]
    assert exclude_for_next_submission(events, POLICY, partition, nodes_needed=4, now=NOW) == []
    assert exclude_for_next_submission(events, POLICY, partition, nodes_needed=9, now=NOW) == []


def test_ledger_appends_and_skips_a_torn_line(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAUNCH_HOME", str(tmp_path))
    ledger = NodeLedger.for_profile("local")
    assert ledger.path == tmp_path / "ledger" / "local.jsonl" and ledger.events() == []
    ledger.append(ev("a", "hang"))
    with ledger.path.open("a") as f:
        f.write('{"host": "b", "kind": "ha')  # a writer died mid-line
    ledger.append(ev("c", "straggler"))
    assert [(e.host, e.kind) for e in ledger.events()] == [("a", "hang"), ("c", "straggler")]
    with pytest.raises(ValueError, match="unknown node event kind"):
        ledger.append(ev("a", "gremlins"))


# (a damaged line, what the warning says about it)
DAMAGED_LINES = [
    (b"garbage", "not JSON"),
    (b'\xe9t\xe9 {"host": "x"}', "not UTF-8"),
    (b'{"host": "b", "kind": "hang"}', "no 'time'"),  # dated now at every read, it would quarantine b forever
    (b'{"host": "b", "kind": "hang", "time": "yesterday"}', "'time' is 'yesterday', not a time"),
    (b'{"host": "b", "kind": "hang", "time": NaN}', "'time' is nan, not a time"),
    (b'{"host": "b", "kind": "hang", "time": true}', "'time' is True, not a time"),
    (b'{"host": 7, "kind": "hang", "time": 1}', "'host' is 7, not text"),
    (b'{"host": "b", "kind": ["hang"], "time": 1}', "'kind' is ['hang'], not text"),
    (b'{"host": "b", "kind": "gremlins", "time": 1}', "kind 'gremlins' is not one of hang, xid"),
    (b'{"host": "b", "kind": "hang", "time": 1, "colour": "red"}', "unknown field(s) 'colour'"),
    (b'["b", "hang"]', "not a JSON object"),
]


@pytest.mark.parametrize("line, why", DAMAGED_LINES, ids=[why for _, why in DAMAGED_LINES])
def test_a_damaged_line_is_skipped_with_a_warning_and_submit_goes_on(tmp_path, monkeypatch, capsys, line, why):
    import subprocess
    from types import SimpleNamespace

    from cluster import sbatch
    from cluster.profile import ClusterProfile

    monkeypatch.setenv("LLAUNCH_HOME", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", lambda argv, **kwargs: SimpleNamespace(returncode=0, stdout="a\nb\nc\n"))
    ledger = NodeLedger.for_profile("site")
    ledger.append(NodeEvent("a", "hang"))
    with ledger.path.open("ab") as f:
        f.write(line + b"\n")
    assert [e.host for e in ledger.events()] == ["a"]
    assert f"warning: skipped 1 damaged line(s) of {ledger.path} (line 2: {why}" in capsys.readouterr().err
    assert sbatch.quarantined_nodes(ClusterProfile(name="site", nodes=1), {}) == ["a"]  # what submit asks first


def test_a_node_ledger_that_is_not_a_file_is_one_sentence(tmp_path, monkeypatch):
    from cluster import sbatch
    from cluster.profile import ClusterProfile

    monkeypatch.setenv("LLAUNCH_HOME", str(tmp_path))
    NodeLedger.for_profile("site").path.mkdir(parents=True)
    with pytest.raises(LaunchError, match=r"ledger/site.jsonl is not a regular file; move it away"):
        sbatch.quarantined_nodes(ClusterProfile(name="site", nodes=1), {})


def test_submit_keeps_quarantined_nodes_out_as_far_as_the_partition_can_spare(tmp_path, monkeypatch):
    import subprocess
    import time
    from types import SimpleNamespace

    from cluster import exclusion
    from cluster.profile import ClusterProfile

    monkeypatch.setenv("LLAUNCH_HOME", str(tmp_path))
    profile = ClusterProfile(name="site", partition="gpu", nodes=2)
    calls = []

    def sinfo(argv, **kwargs):
        calls.append(argv)
        return SimpleNamespace(returncode=0, stdout="n1\nn2\nn3\nn2\n")

    monkeypatch.setattr(subprocess, "run", sinfo)
    assert exclusion.quarantined_nodes(profile, {}) == [] and calls == []  # an empty ledger asks nothing
    ledger = NodeLedger.for_profile("site")
    ledger.append(NodeEvent("n2", "hang", time=time.time() - 60))
    ledger.append(NodeEvent("n3", "xid", time=time.time()))
    assert exclusion.quarantined_nodes(profile, {}) == ["n3"]  # 3 nodes, 2 needed: one to spare, the newest
    assert calls[-1][-2:] == ["--partition", "gpu"]
    assert exclusion.quarantined_nodes(ClusterProfile(name="site", partition="gpu", nodes=3), {}) == []


def test_a_node_that_fails_the_doctor_is_a_hard_event_and_kept_out_of_the_next_submission(tmp_path, monkeypatch,
                                                                                         slurm_node):
    """cluster.executor's node task without SLURM: the second node's doctor fails before torchrun."""
    from types import SimpleNamespace

    from cluster.doctor.checks import FAIL, OK, Check
    from cluster.doctor.node import NodeReport

    report = NodeReport(1, "n2", "77", checks=[Check("gpus", OK, "2 GPUs"), Check("storage", FAIL, "read-only")])
    ledger = tmp_path / "ledger.jsonl"
    task = slurm_node(tmp_path, [sys.executable, "-c", "pass"], host="n2", max_requeues=3,
                      node_ledger_path=str(ledger), doctor=True)
    executor = slurm_node.executor
    monkeypatch.setattr(executor.submitit, "JobEnvironment",  # the second node of two
                        lambda: SimpleNamespace(job_id="77", node=1, hostname="n2", global_rank=1))
    monkeypatch.setattr(executor, "node_hostnames", lambda nodelist: ["n1", "n2"])
    monkeypatch.setattr(executor, "preflight", lambda *args: report)
    with pytest.raises(executor.TrainingError, match="doctor: storage failed on n2: read-only"):
        task()
    [event] = NodeLedger(ledger).events()
    assert (event.host, event.kind, event.job_id, event.hard) == ("n2", "doctor", "77", True)
    assert exclude_for_next_submission([event], QuarantinePolicy(), ["n1", "n2", "n3"], 2) == ["n2"]


def test_a_node_ledger_that_cannot_be_written_is_a_warning_not_a_failed_job(tmp_path, capsys):
    """The node task records what it saw; a ledger it cannot write (a directory here) must not end the job."""
    ledger = NodeLedger(tmp_path / "site.jsonl")
    ledger.path.mkdir()
    ledger.append(NodeEvent("n2", "hang", job_id="7", detail="rank 1"))
    err = capsys.readouterr().err
    assert f"could not record hang on n2 in the node ledger {ledger.path}" in err and err.count("\n") == 1
