"""Small modules with one job: no function over 50 lines and no module over 400 in launcher/ and cluster/
(docs/architecture.md, "Rules a newcomer must keep"). Lines are counted from the `def` to the function's last
line (docstring and nested functions included) and over the whole file for a module."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MAX_FUNCTION_LINES, MAX_MODULE_LINES = 50, 400


def sources() -> list[Path]:
    return sorted([*REPO.glob("launcher/**/*.py"), *REPO.glob("cluster/**/*.py")])


def long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    return [f"{path.relative_to(REPO)}:{node.lineno} {node.name} has {node.end_lineno - node.lineno + 1} lines"
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


def test_no_function_is_over_50_lines():
    assert len(sources()) > 100
    offenders = [line for path in sources() for line in long_functions(path)]
    assert not offenders, "split these into functions that each do one thing:\n" + "\n".join(offenders)


def test_no_module_is_over_400_lines():
    sizes = {path.relative_to(REPO).as_posix(): len(path.read_text().splitlines()) for path in sources()}
    offenders = {name: lines for name, lines in sizes.items() if lines > MAX_MODULE_LINES}
    assert not offenders, f"split these into modules that each have one job: {offenders}"
