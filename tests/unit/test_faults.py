"""LLAUNCH_FAULT parsing: the documented forms, and every malformed one is one sentence."""

from __future__ import annotations

import pytest

from launcher.errors import LaunchError
from launcher.train.faults import Fault, FaultInjector, parse_faults


def test_documented_forms():
    assert parse_faults("hang:rank=1,step=4,how=sigstop; slow:rank=0,ms=150;crash:rank=1,step=9") == [
        Fault("hang", 1, 4, how="sigstop"), Fault("slow", 0, ms=150.0), Fault("crash", 1, 9)]
    assert parse_faults("") == []


@pytest.mark.parametrize("text", ["hang:rank=1", "freeze:rank=1,step=2", "slow:rank=1,ms=fast",
                                  "hang:rank=1,step=2,how=nap", "crash:rank=1,step=2,ms=3", "slow:rank=1,ms",
                                  "slow:rank=1,ms=-100", "slow:rank=1,ms=nan", "slow:rank=1,ms=inf",
                                  "slow:rank=1,ms=1e300", "hang:rank=-1,step=2", "crash:rank=1,step=0"])
def test_malformed_faults_are_one_sentence(text):
    with pytest.raises(LaunchError, match="LLAUNCH_FAULT fault .* see docs/faults.md"):
        parse_faults(text)


def test_only_the_named_rank_gets_its_faults(monkeypatch):
    monkeypatch.setenv("LLAUNCH_FAULT", "slow:rank=1,ms=150")
    assert FaultInjector.from_env(0) is None
    assert FaultInjector.from_env(1).slow_s == pytest.approx(0.15)
    monkeypatch.delenv("LLAUNCH_FAULT")
    assert FaultInjector.from_env(1) is None


def test_llaunch_run_refuses_a_bad_fault_or_watchdog_setting_before_writing_anything(tmp_path, monkeypatch, capsys):
    from launcher.cli import main
    from tests.tiny_run import tiny_run_config

    config = tiny_run_config(tmp_path)
    for name, value in (("LLAUNCH_FAULT", "hang:rank=1"), ("LLAUNCH_WATCHDOG", "floor=3")):
        monkeypatch.setenv(name, value)
        assert main(["run", str(config), "--output-dir", str(tmp_path / "out")]) == 2
        assert f"{name} " in capsys.readouterr().err and not (tmp_path / "out").exists()
        monkeypatch.delenv(name)


def test_a_fault_on_a_named_node_strikes_only_there(monkeypatch):
    """node=NAME: a bad node's fault; the rank that takes its place on a spare runs clean."""
    assert parse_faults("hang:rank=1,step=25,node=n2") == [Fault("hang", 1, 25, node="n2")]
    monkeypatch.setenv("LLAUNCH_FAULT", "slow:rank=1,ms=150,node=n2")
    monkeypatch.setenv("SLURMD_NODENAME", "n2")
    assert FaultInjector.from_env(1).slow_s == pytest.approx(0.15)
    monkeypatch.setenv("SLURMD_NODENAME", "n3")
    assert FaultInjector.from_env(1) is None
