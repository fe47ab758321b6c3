"""The job dir's layout has one owner (launcher/jobdir/layout.py): no module spells one of its names, and every
path a run writes at the top of its directory is one of JobDir's."""

from __future__ import annotations

import ast
from pathlib import Path

from launcher.jobdir.layout import JobDir
from tests.unit.test_env import MODULES, REPO, code_strings

LAYOUT = REPO / "launcher" / "jobdir" / "layout.py"
ROOT = JobDir(Path("/job"))
PATHS = [getattr(ROOT, name) for name, value in vars(JobDir).items() if isinstance(value, property)]
NAMES = {path.relative_to(ROOT.root).parts[0] for path in PATHS} | {ROOT.watchdog_phases("*").name.split("*")[0]}
DISTINCT = {name for name in NAMES if "." in name or "-" in name}  # plan.yaml, rank-exits, ...: never prose


def joined_names(tree: ast.AST):
    """`something / "name"` and `.joinpath("name")`: a path built from a name."""
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant):
            yield node.right
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "joinpath":
            yield from (a for a in node.args if isinstance(a, ast.Constant))


def test_no_module_spells_a_name_of_the_job_dir_outside_its_layout():
    spelled = []
    for path in MODULES:
        if path == LAYOUT:
            continue
        tree = ast.parse(path.read_text(), str(path))
        spelled += [f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}" for node in code_strings(tree)
                    if any(name in node.value for name in DISTINCT)]
        spelled += [f"{path.relative_to(REPO)}:{node.lineno}: / {node.value!r}" for node in joined_names(tree)
                    if node.value in NAMES]
    assert not spelled, "take the path from launcher.jobdir.layout.JobDir instead:\n" + "\n".join(spelled)


def test_the_layout_names_every_top_level_entry_once():
    assert len(PATHS) == len(set(PATHS)) and all(path.parent in (ROOT.root, ROOT.doctor) for path in PATHS)
    assert {"plan.yaml", "config.yaml", "metrics.jsonl", "events.jsonl", "tensorboard", "checkpoints", "final",
            ".llaunch.lock", "hangs", "rank-exits", "doctor", "slurm", "watchdog-phases-", "code", "notify.jsonl"} == NAMES
