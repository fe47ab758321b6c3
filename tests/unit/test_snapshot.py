"""Frozen code (cluster/snapshot.py): what `llaunch submit` copies into JOB_DIR/code from a real git repository and
from llaunch's own source, the lines that make every node and requeue start there, what `status` says about it, and
the doctor's comparison of a node's environment with the one recorded at submit."""

from __future__ import annotations

import json
import subprocess
import types
from importlib import metadata
from pathlib import Path

import pytest

from cluster import snapshot
from cluster.doctor import checks
from cluster.snapshot import FrozenCode, user_code
from cluster.submission import LLAUNCH_SOURCE
from launcher.errors import LaunchError
from launcher.jobdir.layout import JobDir


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=u", "-c", "user.email=u@x", *args], check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path) -> Path:
    """A user's repository: a config and a module committed; outputs git ignores and an untracked venv beside."""
    root = tmp_path / "repo"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "model.py").write_text("WIDTH = 32\n")
    (root / "train.yaml").write_text("model: {}\n")
    (root / ".gitignore").write_text("out/\n")
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "commit", "-qm", "first")
    (root / "out").mkdir()
    (root / "out" / "weights.bin").write_bytes(b"\0" * 1024)
    (root / "venv").mkdir()
    (root / "venv" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    return root


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_a_committed_repository_and_llaunch_are_frozen_and_a_later_edit_reaches_neither(repo, tmp_path):
    job = tmp_path / "job"
    frozen = FrozenCode(job, user_code(repo / "train.yaml", None, allow_dirty=False))
    manifest = frozen.freeze()
    (repo / "pkg" / "model.py").write_text("WIDTH = 64\n")  # after the submit
    code = JobDir(job).code
    assert files_under(code / "user") == [".gitignore", "pkg/model.py", "train.yaml"]  # git's files, nothing else
    assert (code / "user" / "pkg" / "model.py").read_text() == "WIDTH = 32\n"
    own = files_under(code / "llaunch")
    assert {"launcher/__init__.py", "cluster/snapshot.py", "ds_configs/__init__.py"} <= set(own)
    assert not [name for name in own if "__pycache__" in name or name.endswith(".pyc")]
    assert {name.split("/")[0] for name in own} == {"launcher", "cluster", "ds_configs"}
    head = git(repo, "rev-parse", "HEAD")
    assert manifest["user"] | {"bytes": 0} == {"root": str(repo), "commit": head, "uncommitted": [], "in_git": True,
                                               "files": 3, "bytes": 0}
    assert manifest["torch"] == metadata.version("torch") and manifest["packages"]["torch"] == manifest["torch"]
    assert manifest["cuda"] == snapshot.torch_cuda() and manifest["container"] is None
    assert json.loads((code / snapshot.MANIFEST).read_text()) == manifest
    assert f"torch=={metadata.version('torch')}" in (code / snapshot.FREEZE).read_text()
    line = snapshot.status_line(job)
    assert line.startswith(f"code: {repo} @ {head[:12]}; llaunch ") and line.endswith(f"(frozen in {code})"), line
    assert not list(job.glob(".code.partial-*"))


def test_every_node_starts_in_the_snapshot_and_imports_it_before_the_rest_of_the_submitters_path(repo):
    tree = user_code(repo / "train.yaml", None, allow_dirty=False)
    inherited = f"/opt/extra:{LLAUNCH_SOURCE}:{repo}:"  # the checkouts the snapshot replaces are dropped
    assert FrozenCode(Path("/jobs/a b"), tree, inherited).sbatch_lines() == [
        "cd '/jobs/a b/code/user'", "export PYTHONPATH='/jobs/a b/code/user:/jobs/a b/code/llaunch:/opt/extra'"]
    assert FrozenCode(Path("/jobs/a"), None, "").sbatch_lines() == [
        "cd /jobs/a/code/llaunch", "export PYTHONPATH=/jobs/a/code/llaunch"]
    params = FrozenCode(Path("/jobs/a"), None).in_script({"nodes": 2, "setup": ["module load cuda"]})
    assert params == {"nodes": 2, "setup": ["cd /jobs/a/code/llaunch", "export PYTHONPATH=/jobs/a/code/llaunch",
                                            "module load cuda"]}


def test_uncommitted_changes_are_refused_unless_allowed_and_then_run_with_their_diff_kept(repo, tmp_path):
    (repo / "pkg" / "model.py").write_text("WIDTH = 64\n")
    git(repo, "add", "pkg/model.py")  # staged or not, it is not the commit
    with pytest.raises(LaunchError, match=r"has uncommitted changes \(1 file\(s\): pkg/model.py\); commit them, or "
                                          r"pass --allow-dirty"):
        user_code(repo / "train.yaml", None, allow_dirty=False)
    job = tmp_path / "job"
    manifest = FrozenCode(job, user_code(repo / "train.yaml", None, allow_dirty=True)).freeze()
    code = JobDir(job).code
    assert (code / "user" / "pkg" / "model.py").read_text() == "WIDTH = 64\n"
    diff = (code / snapshot.DIFF).read_text()
    assert "-WIDTH = 32" in diff and "+WIDTH = 64" in diff
    assert manifest["user"]["uncommitted"] == ["pkg/model.py"] and manifest["user"]["diff"] == str(code / snapshot.DIFF)
    assert f"@ {git(repo, 'rev-parse', 'HEAD')[:12]} + 1 uncommitted file(s) ({code / snapshot.DIFF})" in \
        snapshot.status_line(job)


def test_without_a_repository_only_llaunch_is_frozen_and_code_outside_git_is_copied_but_venvs(tmp_path, repo):
    config = tmp_path / "loose" / "train.yaml"
    config.parent.mkdir()
    config.write_text("model: {}\n")
    assert user_code(config, None, allow_dirty=False) is None
    assert FrozenCode(tmp_path / "job", None).describe().endswith("llaunch only (the config is in no git repository; "
                                                                  "--code DIR adds yours)")
    plain = tmp_path / "plain"
    for name in ("mod.py", "__pycache__/mod.cpython-311.pyc", "env/pyvenv.cfg", "env/lib/x.py", "sub/b.pyc", "sub/a.py"):
        (plain / name).parent.mkdir(parents=True, exist_ok=True)
        (plain / name).write_text("x\n")
    tree = user_code(config, str(plain), allow_dirty=False)
    assert (tree.files, tree.commit, tree.in_git) == (("mod.py", "sub/a.py"), None, False)
    assert user_code(config, str(repo / "pkg"), allow_dirty=False).files == ("model.py",)  # DIR's part of its repo
    with pytest.raises(LaunchError, match="--code .* is not a directory; pass the directory of the code"):
        user_code(config, str(config), allow_dirty=False)


def test_code_too_large_to_be_code_is_refused_naming_its_largest_file(repo, monkeypatch):
    (repo / "pkg" / "weights.bin").write_bytes(b"\0" * 4096)
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "weights")
    monkeypatch.setattr(snapshot, "MAX_CODE_BYTES", 2048)
    with pytest.raises(LaunchError, match=r"is 4\.04 KiB, more than 2 KiB \(the largest file: pkg/weights.bin\); pass --code"):
        user_code(repo / "train.yaml", None, allow_dirty=False)


def test_torchs_cuda_version_is_read_from_its_version_file_without_importing_it(tmp_path, monkeypatch):
    (tmp_path / "version.py").write_text("from typing import Optional\n__version__ = '2.6.0+cu124'\n"
                                         "cuda: Optional[str] = '12.4'\n")
    monkeypatch.setattr(snapshot.util, "find_spec", lambda name: types.SimpleNamespace(
        submodule_search_locations=[str(tmp_path)]))
    assert snapshot.torch_cuda() == "12.4"
    (tmp_path / "version.py").write_text("cuda = None\n")
    assert snapshot.torch_cuda() is None


RECORDED = {"python": "3.11.2", "torch": "2.13.0", "cuda": "12.4", "container": None,
            "packages": {"torch": "2.13.0", "numpy": "2.1.0", "peft": "0.13.0"}}


@pytest.mark.parametrize("here, status, sentence", [
    ({}, checks.OK, "python 3.11.2, torch 2.13.0 and 3 packages as at submit"),
    ({"torch": "2.14.0", "packages": {**RECORDED["packages"], "torch": "2.14.0"}}, checks.WARN,
     "torch 2.14.0 here, 2.13.0 at submit; the job's code is frozen but not its environment"),
    ({"packages": {"torch": "2.13.0", "numpy": "2.2.0", "accelerate": "1.0"}}, checks.WARN,
     "3 package(s) differ: accelerate 1.0 (was None), numpy 2.2.0 (was 2.1.0), peft None (was 0.13.0); the job"),
])
def test_the_doctor_warns_of_a_node_environment_other_than_the_recorded_one(here, status, sentence):
    check = checks.environment(RECORDED, {**RECORDED, **here})
    assert (check.name, check.status) == ("environment", status) and sentence in check.sentence, check.sentence


def test_the_doctor_skips_the_comparison_without_a_record_or_in_a_container():
    assert checks.environment(None, RECORDED).status == checks.SKIP
    check = checks.environment({**RECORDED, "container": "/images/train.sqsh"}, RECORDED)
    assert check.status == checks.SKIP and "/images/train.sqsh" in check.sentence
