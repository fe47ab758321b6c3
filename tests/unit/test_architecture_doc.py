"""docs/architecture.md stays true: every file, folder, module and name it shows in backticks exists.

A path (`launcher/planning/plan.py`, `cluster/profiles/*.yaml`) must match something in the repository; a bare
file name must exist under the folder its section is about; a dotted name (`launcher.runtime.node`,
`engines.build_engine`) must be a module, or a name a module defines; a bare identifier (`JobDir`,
`check_knob`) must be defined (a class, function, constant or field) somewhere in launcher/ or cluster/."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "architecture.md"
CODE_FOLDERS = ("launcher", "cluster", "ds_configs", "tests", "bench", "examples")
WORDS = {"plan.yaml", "config.yaml", "metrics.jsonl", "events.jsonl", "final/", "hangs/", "tensorboard/"}  # run-dir names


@cache
def defined_names() -> frozenset[str]:
    """Every name a module of the project defines at top level or in a class body, plus dataclass fields."""
    names: set[str] = set()
    for folder in CODE_FOLDERS:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.add(node.name)
                elif isinstance(node, ast.Assign):
                    names.update(t.id for t in node.targets if isinstance(t, ast.Name))
                elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    names.add(node.target.id)
    return frozenset(names)


def module_file(dotted: str) -> Path | None:
    base = REPO / dotted.replace(".", "/")
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.exists()), None)


def dotted_exists(dotted: str) -> bool:
    """A module, or a module's name (`launcher.planning.plan.ENGINE_SUPPORT`, `engines.build_engine`, with the
    package path left out where the text makes it plain)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if module_file(head) or (cut < len(parts) and any(module_file(f"{p}.{head}") for p in PREFIXES)):
            return all(name in defined_names() for name in parts[cut:])
    return parts[-1] in defined_names() and parts[0] in PACKAGE_WORDS


PREFIXES = ("launcher", "launcher.train", "launcher.planning", "launcher.train.engines", "launcher.observe",
            "launcher.runtime", "launcher.jobdir", "cluster")
PACKAGE_WORDS = {"plan", "engines", "knobs", "training_data", "data", "models"}


def path_exists(token: str, folder: Path) -> bool:
    pattern = token.rstrip("/")
    if any(REPO.glob(pattern)) or any(folder.glob(pattern)):
        return True
    return any(folder.rglob(pattern))  # a file in a sub-folder of the section's (`fsdp.py` under train/engines)


def tokens_by_section() -> list[tuple[Path, str]]:
    """Each backticked token with the folder of the section it appears in (the heading's first path)."""
    folder, found = REPO, []
    for line in DOC.read_text().splitlines():
        if line.startswith("#"):
            heading = re.search(r"`([\w/.-]+/)`", line)
            folder = REPO / heading.group(1) if heading else REPO
        found += [(folder, token) for token in re.findall(r"`([^`\s]+)`", line)]
    return found


def test_every_file_module_and_name_the_architecture_doc_shows_exists():
    missing = []
    for folder, token in tokens_by_section():
        token = token.split("(")[0].rstrip(",.:")
        if token in WORDS or token.startswith(("-", "../")) or not token:  # ../: beside the checkout, not in it
            continue
        if "/" in token or re.search(r"\.(py|sh|yaml|json|md|toml|txt)$", token):
            ok = path_exists(token, folder)
        elif re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)+", token):
            ok = dotted_exists(token)
        elif re.fullmatch(r"[A-Za-z_]\w*", token) and (token[0].isupper() or "_" in token):
            ok = token in defined_names()
        else:
            continue  # a value, a command, a flag: not a name of the code
        if not ok:
            missing.append(f"{token} (section {folder.relative_to(REPO)})")
    assert not missing, "docs/architecture.md names what does not exist: " + ", ".join(missing)


def test_the_rules_each_name_the_test_that_keeps_them():
    rules = DOC.read_text().split("## Rules a newcomer must keep")[1].split("\n## ")[0]
    for rule in rules.split("\n- ")[1:]:
        if "never deletes" in rule or "constraints.txt" in rule:
            continue  # kept by review and by `make lock`, not by a unit test
        tests = re.findall(r"`(tests/[\w/]+\.py)`", rule)
        assert tests and all((REPO / t).exists() for t in tests), f"this rule names no test that exists: {rule[:80]}"
