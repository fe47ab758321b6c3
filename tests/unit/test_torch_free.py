"""The launcher side loads no torch, by its module boundaries: every launcher-side module imported in a fresh
interpreter, `llaunch run --dry-run` and `llaunch submit --dry-run` end to end, and no package cycle between
launcher/ and cluster/ (docs/architecture.md, "Rules a newcomer must keep")."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from tests.tiny_run import tiny_run_config

REPO = Path(__file__).resolve().parents[2]
# The launcher-side files that may load torch: the commands that load a model, `plan --trace`, and the doctor's
# all-reduce worker. launcher/train/ is the ranks' side.
LOADS_TORCH = {"launcher/cli/generate.py", "launcher/cli/export.py", "launcher/cli/lr_find.py",
               "launcher/planning/memory_trace.py", "launcher/planning/memory_trace_layout.py",
               "launcher/planning/memory_trace_ring.py",
               "cluster/doctor/allreduce.py"}
# Importing these modules is not an import: it runs a command.
ENTRY_POINTS = {"launcher/__main__.py"}
# Runs in a fresh interpreter: imports the modules named on its command line one by one and prints the first
# after whose import torch is loaded. sys.modules only grows, so the first module that loads torch (itself or
# through what it imports) is named, wherever it comes in the order.
FIRST_TORCH_LOADER = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
    if "torch" in sys.modules:
        print(name)
        break
"""


def launcher_side_files() -> list[str]:
    files = [*REPO.glob("launcher/**/*.py"), *REPO.glob("cluster/**/*.py")]
    relative = sorted(f.relative_to(REPO).as_posix() for f in files)
    return [f for f in relative if not f.startswith("launcher/train/") and f not in LOADS_TORCH | ENTRY_POINTS]


def module_name(relative: str) -> str:
    return relative.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def python(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def import_tree(importtime: str) -> list[tuple[int, str]]:
    """(depth, module) of each import a `python -X importtime` run made, from its stderr; an import is listed
    after the imports it made, one level deeper."""
    names = [line.rsplit("|", 1)[1] for line in importtime.splitlines() if line.startswith("import time:")]
    return [((len(name) - len(name.lstrip()) - 1) // 2, name.strip()) for name in names]


def imported_modules(importtime: str) -> set[str]:
    return {name for _, name in import_tree(importtime)}


def torch_import_chain(module: str) -> str:
    """How importing `module` reaches torch: 'module -> ... -> torch'."""
    tree = import_tree(python("-X", "importtime", "-c", f"import {module}").stderr)
    at = next(i for i, (_, name) in enumerate(tree) if name == "torch")
    chain, depth = ["torch"], tree[at][0]
    for level, name in tree[at + 1:]:
        if level < depth:
            chain.append(name)
            depth = level
    return " -> ".join(reversed(chain))


def test_no_launcher_side_module_loads_torch():
    modules = [module_name(f) for f in launcher_side_files()]
    assert {"launcher.jobdir.prepare", "launcher.cli.run", "launcher.cli.submit", "cluster.executor",
            "launcher.planning.planner", "launcher.runtime.watchdog", "cluster.doctor.node"} <= set(modules)
    done = python("-c", FIRST_TORCH_LOADER, *modules)
    assert done.returncode == 0, done.stderr
    culprit = done.stdout.strip()
    assert not culprit, f"importing {culprit} loads torch: {torch_import_chain(culprit)}"


def test_run_and_submit_dry_runs_load_no_torch(tmp_path):
    """A cold token cache: `run` has the data helper build it in a child process; its own imports hold no torch."""
    config = tiny_run_config(tmp_path, cache_dir=tmp_path / "cache")
    commands = (["run", str(config), "--output-dir", str(tmp_path / "run"), "--dry-run"],
                ["submit", str(config), "--cluster", "local", "--output-dir", str(tmp_path / "job"), "--dry-run"])
    for command in commands:
        done = python("-X", "importtime", "-m", "launcher", *command, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        loaded = imported_modules(done.stderr)
        assert "launcher.jobdir.prepare" in loaded and "launcher.planning.planner" in loaded
        assert not {m for m in loaded if m == "torch" or m.startswith("torch.")}, command[0]
    assert list((tmp_path / "cache").rglob("tokens.npy"))  # the helper built the cache


def cluster_imports(relative: str) -> set[str]:
    """The cluster modules a file imports, at module level or inside a function."""
    tree = ast.parse((REPO / relative).read_text(), relative)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return {name for name in names if name == "cluster" or name.startswith("cluster.")}


def test_only_the_cli_imports_cluster_so_the_packages_have_no_cycle():
    files = [f.relative_to(REPO).as_posix() for f in REPO.glob("launcher/**/*.py")]
    importers = {f for f in files if not f.startswith("launcher/cli/") and cluster_imports(f)}
    assert importers == set(), "launcher/ imports cluster/ outside launcher/cli"
