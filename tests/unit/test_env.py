"""The one list of environment variables (launcher/env.py): no module spells an LLAUNCH_* name (or SLURM_CONF)
outside it, none writes os.environ for another, and the supervision settings resolve env > config > profile."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from launcher import env
from launcher.errors import LaunchError

REPO = Path(__file__).resolve().parents[2]
MODULES = sorted(p for folder in ("launcher", "cluster", "bench") for p in (REPO / folder).rglob("*.py"))
NAME = re.compile(r"\bLLAUNCH_[A-Z]|\bSLURM_CONF\b")
# Writes of os.environ that are the process's own, not a message to another module:
OWN_ENVIRON = {
    "launcher/env.py",  # SLURM_CONF for the length of a submitit call (submitit takes no env), restored after
    "launcher/runtime/torchrun.py",  # torchrun's agent names itself its ranks' supervisor: they inherit its env
    "launcher/train/distributed.py",  # torch's own RANK / WORLD_SIZE defaults for a world of one
    "bench/checkpoint.py", "bench/throughput.py",  # a benchmark restores the environment its steps changed
}


def code_strings(tree: ast.AST):
    """Every string constant but docstrings (which may name a variable in prose)."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node


def test_no_module_spells_a_variable_name_outside_env_py():
    spelled = [f"{path.relative_to(REPO)}:{node.lineno}: {node.value.strip()[:60]!r}"
               for path in MODULES if path != REPO / "launcher" / "env.py"
               for node in code_strings(ast.parse(path.read_text(), str(path))) if NAME.search(node.value)]
    assert not spelled, "take the name from launcher.env's record instead:\n" + "\n".join(spelled)


def writes_environ(tree: ast.AST) -> list[int]:
    def is_environ(node) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == "environ"

    lines = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AugAssign) else []
        targets += node.targets if isinstance(node, ast.Delete) else []
        lines += [t.lineno for t in targets if isinstance(t, ast.Subscript) and is_environ(t.value)]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and is_environ(node.func.value) and \
                node.func.attr in ("update", "setdefault", "pop", "clear", "popitem"):
            lines.append(node.lineno)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "putenv":
            lines.append(node.lineno)
    return lines


def test_no_module_writes_os_environ_for_another():
    writes = [f"{path.relative_to(REPO)}:{line}" for path in MODULES
              if str(path.relative_to(REPO)) not in OWN_ENVIRON for line in writes_environ(ast.parse(path.read_text()))]
    assert not writes, "pass an env dict to the subprocess instead:\n" + "\n".join(writes)


def test_every_variable_is_declared_once_with_its_writer_readers_and_meaning():
    names = [v.name for v in env.VARIABLES]
    assert len(names) == len(set(names))
    assert all(v.writer and v.readers and v.meaning for v in env.VARIABLES)
    declared = {v.name for v in vars(env).values() if isinstance(v, env.EnvVar)}
    assert declared == set(names)  # none declared and left out of the list


def test_slurm_conf_is_set_for_submitit_alone_and_restored(monkeypatch):
    import os

    monkeypatch.setenv(env.SLURM_CONF.name, "/etc/slurm/slurm.conf")
    with env.slurm_conf_for_submitit({env.SLURM_CONF.name: "/tmp/x/slurm.conf"}):
        assert os.environ[env.SLURM_CONF.name] == "/tmp/x/slurm.conf"
    assert os.environ[env.SLURM_CONF.name] == "/etc/slurm/slurm.conf"
    monkeypatch.delenv(env.SLURM_CONF.name)
    with env.slurm_conf_for_submitit({env.SLURM_CONF.name: "/tmp/x/slurm.conf"}):
        pass
    assert env.SLURM_CONF.name not in os.environ


def test_the_collective_timeout_is_the_variable_then_the_config_then_the_profile():
    variable = {env.DIST_TIMEOUT_S.name: "120"}
    assert env.dist_timeout_s(variable, config=60, profile=300) == 120
    assert env.dist_timeout_s({}, config=60, profile=300) == 60
    assert env.dist_timeout_s({}, config=None, profile=300) == 300
    assert env.dist_timeout_s({}) is None  # torch's default
    with pytest.raises(LaunchError, match="LLAUNCH_DIST_TIMEOUT_S='0' must be a number of seconds"):
        env.dist_timeout_s({env.DIST_TIMEOUT_S.name: "0"}, config=60)


def test_llaunch_home_holds_job_records_history_and_node_ledgers(tmp_path):
    variables = {env.HOME.name: str(tmp_path)}
    assert [env.records_dir(variables), env.history_dir(variables), env.node_ledger_dir(variables)] == \
           [tmp_path / "jobs", tmp_path / "history", tmp_path / "ledger"]


def test_the_watchdog_settings_are_the_variable_then_the_config_then_the_profile_key_by_key():
    from launcher.runtime.watchdog_config import WatchdogConfig

    resolved = WatchdogConfig.resolve({env.WATCHDOG.name: "poll_s=0.5"}, config={"floor_s": 30, "poll_s": 2},
                                      profile={"floor_s": 60, "grace_s": 20, "poll_s": 3})
    assert (resolved.poll_s, resolved.floor_s, resolved.grace_s, resolved.k) == (0.5, 30, 20, WatchdogConfig.k)
    assert not WatchdogConfig.resolve({env.WATCHDOG.name: "off"}, config={"enabled": True}).enabled
    assert not WatchdogConfig.resolve({}, config={}, profile={"enabled": False}).enabled


def test_run_and_submit_give_the_ranks_the_collective_timeout_by_that_precedence(tmp_path, capsys, monkeypatch):
    import yaml

    from launcher.cli import main
    from tests.tiny_run import tiny_run_config

    monkeypatch.delenv(env.DIST_TIMEOUT_S.name, raising=False)
    config = tiny_run_config(tmp_path)
    run = ["run", str(config), "--output-dir", str(tmp_path / "run"), "--dry-run"]
    assert main(run) == 0 and env.DIST_TIMEOUT_S.name not in capsys.readouterr().out  # torch's default
    assert main([*run, "supervision.dist_timeout_s=42"]) == 0
    assert f"{env.DIST_TIMEOUT_S.name}=42 " in capsys.readouterr().out
    profile = yaml.safe_load((REPO / "cluster" / "profiles" / "local.yaml").read_text())
    (tmp_path / "site.yaml").write_text(yaml.safe_dump({**profile, "dist_timeout_s": 600}))
    submit = ["submit", str(config), "--cluster", str(tmp_path / "site.yaml"), "--output-dir", str(tmp_path / "job"),
              "--dry-run"]
    submit_90 = [*submit[:2], "supervision.dist_timeout_s=90", *submit[2:]]
    assert main(submit) == 0 and f"{env.DIST_TIMEOUT_S.name}=600 " in capsys.readouterr().out
    assert main(submit_90) == 0
    assert f"{env.DIST_TIMEOUT_S.name}=90 " in capsys.readouterr().out
    monkeypatch.setenv(env.DIST_TIMEOUT_S.name, "7")
    assert main([*run, "supervision.dist_timeout_s=42"]) == 0
    assert f"{env.DIST_TIMEOUT_S.name}=7 " in capsys.readouterr().out
    assert main(submit_90) == 0
    assert f"{env.DIST_TIMEOUT_S.name}=7 " in capsys.readouterr().out


def test_submit_folds_the_profiles_watchdog_settings_under_the_configs_into_the_job():
    from cluster.profile import load_profile
    from launcher.cli.submit import _supervision
    from launcher.config import SupervisionSection

    profile = load_profile("local").replace(dist_timeout_s=600)
    profile.watchdog = {"floor_s": 60, "grace_s": 20}
    supervision = SupervisionSection(watchdog={"floor_s": 30})
    job_profile = _supervision(supervision, profile, {})
    assert supervision.watchdog == {"floor_s": 30, "grace_s": 20} and job_profile.dist_timeout_s == 600
