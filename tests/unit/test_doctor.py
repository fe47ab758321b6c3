"""`llaunch doctor`: each check's verdict from plain facts, the fact exchange between nodes, the fault hooks
and a bad flag (the all-reduce runs, with torch, in tests/distributed/test_doctor_nodes.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from cluster.doctor import checks, exchange
from cluster.doctor.checks import FAIL, OK, SKIP, WARN
from cluster.doctor.faults import Faults
from cluster.doctor.node import job_facts
from cluster.doctor.probes import GpuHealth, port_busy
from launcher.errors import LaunchError

HOSTS = ["n1", "n2", "n3"]


def rendezvous(**kw):
    args = dict(resolves=True, reach_error=None, port_busy=False, first_node_addr="10.0.0.1", first_host="n1")
    return checks.rendezvous("10.0.0.1", 20042, **{**args, **kw})


@pytest.mark.parametrize("kw,status,words", [
    ({}, OK, "10.0.0.1:20042 resolves and answers, port free"),
    ({"resolves": False}, FAIL, "does not resolve here"),
    ({"reach_error": "connection refused"}, FAIL, "cannot reach the first node at 10.0.0.1 (connection refused)"),
    ({"first_node_addr": "10.0.0.9"}, FAIL, "NodeAddr is 10.0.0.9"),
    ({"port_busy": True}, FAIL, "port 20042 is taken on the first node (n1)"),
    ({"port_busy": None}, OK, "resolves and answers"),  # not the first node: the port is not its to check
])
def test_rendezvous(kw, status, words):
    check = rendezvous(**kw)
    assert check.status == status and words in check.sentence


def test_interfaces_pin_the_job_to_those_that_reach_every_node():
    check, env = checks.interfaces({"eth0": [], "ib0": []}, {})
    assert check.status == OK and env == {}
    check, env = checks.interfaces({"eth0": ["n3"], "ib0": [], "ib1": []}, {})
    assert check.status == WARN and "eth0 does not reach n3" in check.sentence
    assert env == {"GLOO_SOCKET_IFNAME": "ib0,ib1", "NCCL_SOCKET_IFNAME": "ib0,ib1"}
    check, env = checks.interfaces({"eth0": ["n3"], "ib0": []}, {"NCCL_SOCKET_IFNAME": "eth0"})
    assert check.status == WARN and env == {} and "kept your NCCL_SOCKET_IFNAME=eth0" in check.sentence
    check, env = checks.interfaces({"eth0": ["n2", "n3"]}, {})
    assert check.status == FAIL and env == {}
    assert checks.interfaces({}, {})[0].status == SKIP


def test_storage_names_the_node_that_does_not_see_the_nonce():
    assert checks.storage("/jobs/a", first=True, seen=True, first_host="n1").status == OK
    assert checks.storage("/jobs/a", first=False, seen=True, first_host="n1").status == OK
    check = checks.storage("/jobs/a", first=False, seen=False, first_host="n1")
    assert check.status == FAIL and "does not see the file n1 wrote in /jobs/a" in check.sentence


def test_space_needs_bytes_and_inodes_and_keeps_the_write_speed():
    kw = dict(need_inodes=100, why="3 checkpoint(s)", bandwidth=5e8)
    ok = checks.space("/d", free_bytes=10**12, free_inodes=10**6, need_bytes=10**11, **kw)
    assert ok.status == OK and ok.data["write_bytes_per_s"] == 5e8 and "/s" in ok.sentence
    short = checks.space("/d", free_bytes=10**10, free_inodes=10**6, need_bytes=10**11, **kw)
    assert short.status == FAIL and "save_total_limit" in short.sentence and "3 checkpoint(s)" in short.sentence
    assert checks.space("/d", free_bytes=10**12, free_inodes=50, need_bytes=1, **kw).status == FAIL
    assert checks.space("/d", free_bytes=10**12, free_inodes=None, need_bytes=1, **kw).status == OK  # no inode count


def test_software_names_what_differs_from_the_first_node():
    first = {"python": "3.11.7", "torch": "2.5.1", "config_hash": "ab"}
    assert checks.software(dict(first), first, "n1").status == OK
    check = checks.software({**first, "torch": "2.4.0", "config_hash": "cd"}, first, "n1")
    assert check.status == FAIL
    assert "torch 2.4.0 here but 2.5.1 on n1" in check.sentence and "config_hash cd here but ab" in check.sentence


def test_clock_warns_over_a_second():
    assert checks.clock(0.3, "n1").status == OK
    assert checks.clock(-1.5, "n1").status == WARN


@pytest.mark.parametrize("result,node,status,words", [
    ({"ok": True, "seconds": 0.1}, 1, OK, "over 3 node(s)"),
    ({"ok": False, "error": "timeout", "failed_peers": [2]}, 0, FAIL, "fails with n3 (pairwise from n1)"),
    ({"ok": False, "error": "timeout", "self_failed": True}, 2, FAIL, "this node (n3) fails the all-reduce with n1"),
    ({"ok": False, "error": "EADDRINUSE", "self_failed": True}, 0, FAIL, "could not start on this first node"),
    ({"ok": False, "error": "timeout", "self_failed": False}, 1, FAIL, "this node's pair with n1 works"),
])
def test_allreduce_names_the_failing_node(result, node, status, words):
    check = checks.allreduce(result, node, HOSTS)
    assert check.status == status and words in check.sentence


GiB = 2**30


@pytest.mark.parametrize("change,words", [
    ({"ecc_uncorrected": 2}, "2 uncorrected ECC"),
    ({"retired_pages_pending": True}, "retired pages pending"),
    ({"remapped_rows_failed": True}, "failed a row remap"),
    ({"remapped_rows_pending": True}, "row remaps pending"),
    ({"other_processes": [4242]}, "used by pid(s) 4242"),
    ({"memory_total": 40 * GiB}, "the plan assumed 80 GiB"),
])
def test_gpus_fail_on_each_health_problem(change, words):
    healthy = [GpuHealth(index=i, name="H100", memory_total=80 * GiB) for i in range(2)]
    kw = dict(device="cuda", gpus_per_node=2, gpu_mem_bytes=80 * GiB)
    assert checks.gpus(healthy, **kw).status == OK
    sick = [GpuHealth.from_dict({**healthy[0].to_dict(), **change}), healthy[1]]
    check = checks.gpus(sick, **kw)
    assert check.status == FAIL and words in check.sentence and "GPU 0" in check.sentence


def test_gpus_count_and_absence():
    kw = dict(device="cuda", gpus_per_node=8, gpu_mem_bytes=0)
    assert "1 GPU(s) but the plan needs 8" in checks.gpus([GpuHealth(memory_total=GiB)], **kw).sentence
    assert checks.gpus(None, **kw).status == FAIL
    assert checks.gpus(None, device="cpu", gpus_per_node=1, gpu_mem_bytes=0).status == SKIP


def test_fault_hooks_are_off_by_default_and_parsed_from_the_environment():
    assert Faults.from_env({}) == Faults()
    faults = Faults.from_env({"LLAUNCH_DOCTOR_FAULT_PORT": "1", "LLAUNCH_DOCTOR_FAULT_VERSION": "1:torch=0.0.0",
                              "LLAUNCH_DOCTOR_FAULT_NVML": '[{"ecc_uncorrected": 1}]',
                              "LLAUNCH_DOCTOR_FAULT_MIN_FREE_BYTES": "123", "LLAUNCH_DOCTOR_FAULT_LOCAL_STORAGE": "1"})
    assert faults == Faults(True, True, ("1", "torch", "0.0.0"), [{"ecc_uncorrected": 1}], 123)
    assert (faults.version_on(1, "n2"), faults.version_on(0, "n1")) == ({"torch": "0.0.0"}, {})
    by_host = Faults.from_env({"LLAUNCH_DOCTOR_FAULT_VERSION": "n2:torch=0.0.0"})  # follows the host, not the index
    assert (by_host.version_on(0, "n2"), by_host.version_on(1, "n3")) == ({"torch": "0.0.0"}, {})
    for bad in ("torch", ":torch=1", "1:=1"):
        with pytest.raises(LaunchError, match="malformed"):
            Faults.from_env({"LLAUNCH_DOCTOR_FAULT_VERSION": bad})


def test_checkpoint_size_comes_from_the_estimator_and_keep_from_the_config():
    from launcher.config import TrainConfig
    from launcher.planning.memory_sizes import checkpoint_bytes
    from launcher.planning.plan import TrainSetup
    from launcher.planning.plan import Plan

    params = 7 * 10**9
    assert checkpoint_bytes(params, params, TrainSetup()) == 12 * params  # fp32 weights + AdamW m, v
    assert checkpoint_bytes(params, 10**7, TrainSetup(method="lora")) < 5 * params
    config = TrainConfig()
    config.training.max_steps, config.training.save_steps = 1000, 100
    plan = Plan(model="m", params=params)
    assert job_facts(config, plan) == (10, params)
    config.training.save_total_limit = 2
    assert job_facts(config, plan)[0] == 2


def test_facts_travel_with_the_clock_and_the_server_knows_who_asked():
    port = free_port()
    server = exchange.FactsServer({"node": 0, "interfaces": {"lo": "127.0.0.1"}}, port)
    try:
        facts, offset = exchange.fetch("127.0.0.1", port, asker=1, timeout_s=5)
        assert facts["interfaces"] == {"lo": "127.0.0.1"} and abs(offset) < 0.5
        server.wait_asked({1}, timeout_s=5)
        assert 1 in server.asked
        assert exchange.reaches("127.0.0.1", port)
    finally:
        server.close()
    assert not exchange.reaches("127.0.0.1", port, timeout_s=1)
    with pytest.raises(OSError, match="no answer"):
        exchange.fetch("127.0.0.1", port, asker=1, timeout_s=0.5)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_port_busy_sees_a_listener_not_a_closed_connection():
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's TCPStore and the doctor listen
        sock.bind(("", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        assert port_busy(port)
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = sock.accept()
        accepted.close()  # the side that closes first keeps the port in TIME_WAIT: no listener, a store can bind
        client.close()
    assert not port_busy(port)


@pytest.mark.parametrize("args,message", [
    (["--nodes", "0"], "--nodes must be a positive integer."),
    (["--cluster", "nope"], "cluster profile 'nope' not found"),
    (["--output-dir", "FILE"], "cannot create FILE/doctor (Not a directory); choose another --output-dir."),
    (["missing.yaml"], "config file missing.yaml does not exist"),
])
def test_doctor_command_bad_input_is_one_sentence(args, message, tmp_path, capsys):
    from launcher.cli import main

    (tmp_path / "FILE").write_text("mine")
    args = [a.replace("FILE", str(tmp_path / "FILE")) for a in args]
    assert main(["doctor", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llaunch: error: ") and message.replace("FILE", str(tmp_path / "FILE")) in err
    assert len(err.strip().splitlines()) == 1
    assert (tmp_path / "FILE").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]


def test_a_profile_turns_the_doctor_off_for_every_incarnation_of_a_job(tmp_path, monkeypatch):
    import submitit
    import yaml

    from cluster import sbatch
    from cluster.profile import load_profile

    assert load_profile("local").doctor is True
    data = yaml.safe_load((Path(__file__).resolve().parents[2] / "cluster/profiles/local.yaml").read_text())
    path = tmp_path / "quiet.yaml"
    path.write_text(yaml.safe_dump({**data, "doctor": False}))
    submitted = []

    class Sbatch:  # submitit's SlurmExecutor without sbatch: keeps the task it is given
        def __init__(self, **kwargs):
            pass

        def update_parameters(self, **kwargs):
            pass

        def submit(self, task):
            submitted.append(task)
            return SimpleNamespace(job_id=str(len(submitted)))

    monkeypatch.setattr(submitit, "SlurmExecutor", Sbatch)
    sbatch.submit(tmp_path, load_profile(str(path)), "quiet", {})
    assert submitted[0].doctor is False and submitted[0].checkpoint().function.doctor is False
    sbatch.submit(tmp_path, load_profile("local"), "checked", {})
    assert submitted[1].doctor is True and submitted[1].checkpoint().function.doctor is True
    path.write_text(yaml.safe_dump({**data, "doctor": "no"}))
    with pytest.raises(LaunchError, match="doctor must be true or false"):
        load_profile(str(path))


def test_each_interface_a_peer_serves_is_probed_and_the_unreached_peers_named(tmp_path, monkeypatch):
    from cluster.doctor.node import NodeContext, _reach

    port = free_port()
    peer = exchange.FactsServer({"interfaces": {"lo": "127.0.0.1", "ib0": "255.255.255.255"}}, port)
    try:
        ctx = NodeContext(tmp_path, 0, ["n1", "n2"], ["127.0.0.1", "127.0.0.1"],
                          rdzv_port=port - exchange.doctor_port(0, 1))
        assert _reach(ctx, [1], ["lo"]) == {"ib0": ["n2"], "lo": []}
    finally:
        peer.close()
    monkeypatch.setattr("cluster.doctor.node.FETCH_TIMEOUT_S", 0.3)
    assert _reach(ctx, [1], ["eth0", "lo"]) == {"eth0": ["n2"], "lo": ["n2"]}  # no answer: nothing reaches n2


def test_a_taken_doctor_port_is_a_sentence_not_a_traceback(tmp_path):
    import socket

    from cluster.doctor.node import NodeContext, results_path, run_node

    with socket.socket() as held:
        held.bind(("", 0))
        held.listen(1)
        port = held.getsockname()[1]
        ctx = NodeContext(tmp_path, 1, ["n1", "n2"], ["127.0.0.1", "127.0.0.1"],
                          rdzv_port=port - exchange.doctor_port(0, 1), job_id="9")
        report = run_node(ctx, {})
    assert report.failure_sentence().startswith(f"doctor: rendezvous failed on n2: the doctor's own port {port} is taken")
    assert results_path(tmp_path, 1).exists()
