"""Frozen code: what a submitted job imports, copied into its job dir by `llaunch submit`, so that a job that waits
in the queue, or is requeued two days later, runs the code it was submitted with and not the checkout of that day.

JOB_DIR/code (launcher.jobdir.layout.JobDir.code) holds
    user/             the user's code: the files git tracks in the config's repository (or in --code DIR)
    llaunch/          llaunch's own packages (launcher, cluster, ds_configs) as the submitting process imports them
    user.diff         with --allow-dirty, `git diff HEAD --binary` of the user's code: the uncommitted changes it runs
    requirements.txt  `pip freeze` of the submitting interpreter
    snapshot.json     where each tree came from (commit, uncommitted files), python / torch / CUDA, every package

The job's sbatch script starts in user/ (llaunch/ without user code) with PYTHONPATH=user:llaunch before anything
else, so `python -m submitit.core._submit` unpickles the node task (cluster.executor.NodeTask, which cloudpickle
pickles by reference to its module) from the snapshot, and torchrun and the ranks inherit both; a requeue reruns
the same script. This is submitit's RsyncSnapshot (submitit/helpers.py: `git ls-files` into a snapshot dir, then a
chdir before sbatch, so the job starts there) with the chdir written into the script, where a requeue finds it too.
Only what git tracks is copied (never a venv, the outputs or the data git ignores); the interpreter and its
packages are recorded, not copied, and the doctor compares a node's with the record (checks.environment).
"""

from __future__ import annotations

import ast
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata, util
from pathlib import Path

from cluster.submission import LLAUNCH_SOURCE
from launcher.env import PYTHONPATH
from launcher.errors import LaunchError
from launcher.files import write_text_atomic
from launcher.jobdir.layout import JobDir
from launcher.units import format_bytes

USER, LLAUNCH, DIFF, FREEZE, MANIFEST = "user", "llaunch", "user.diff", "requirements.txt", "snapshot.json"
LLAUNCH_PACKAGES = ("launcher", "cluster", "ds_configs")
MAX_CODE_BYTES = 512 * 2**20  # more than any code tree: tracked data or weights belong outside the snapshot
SKIPPED_DIRS = {"__pycache__", ".git"}
GIT_TIMEOUT_S = 60


@dataclass(frozen=True)
class CodeTree:
    """A tree of code to freeze: its root, its files (relative to the root) and git's word on it."""

    root: Path
    files: tuple[str, ...]
    commit: str | None = None  # HEAD of its git repository; None outside git or before the first commit
    uncommitted: tuple[str, ...] = ()  # files that differ from HEAD (every file before the first commit)
    in_git: bool = False

    def record(self) -> dict:
        size = sum((self.root / name).lstat().st_size for name in self.files)
        return {"root": str(self.root), "commit": self.commit, "uncommitted": list(self.uncommitted),
                "in_git": self.in_git, "files": len(self.files), "bytes": size}


def _git(root: Path, *args: str) -> str | None:
    """git's output in `root`, or None where git fails (not a repository) or is not installed."""
    try:
        done = subprocess.run(["git", "--no-optional-locks", "-C", str(root), *args], capture_output=True,
                              timeout=GIT_TIMEOUT_S)  # no lock: a read must not refresh (write) the user's index
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.decode("utf-8", "surrogateescape") if done.returncode == 0 else None


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(name for name in (text or "").split("\0") if name)


def git_tree(root: Path) -> CodeTree | None:
    """The files git tracks under `root` (submodules left out, as RsyncSnapshot's default), with HEAD and the
    tracked files that differ from it; None when `root` is in no git repository."""
    if _git(root, "rev-parse", "--show-toplevel") is None:
        return None
    tracked = [name for name in _names(_git(root, "ls-files", "-z")) if (root / name).is_file()
               or (root / name).is_symlink()]
    commit = (_git(root, "rev-parse", "--verify", "-q", "HEAD") or "").strip() or None
    changed = _names(_git(root, "diff", "HEAD", "--name-only", "-z", "--relative", "--", ".")) if commit else tracked
    return CodeTree(root, tuple(sorted(tracked)), commit, tuple(sorted(changed)), in_git=True)


def plain_tree(root: Path, packages: tuple[str, ...] = ()) -> CodeTree:
    """Every file under `root` (or under its `packages`) but bytecode, .git and any virtual environment."""
    files = []
    for top in [root / name for name in packages] or [root]:
        for folder, dirs, names in os.walk(top):
            dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and not (Path(folder, d) / "pyvenv.cfg").exists())
            files += [str(Path(folder, name).relative_to(root)) for name in names if not name.endswith(".pyc")]
    return CodeTree(root, tuple(sorted(files)))


def user_code(config_path: str | Path, code_dir: str | None, allow_dirty: bool) -> CodeTree | None:
    """The user's code: --code DIR (its tracked files when it is in git, else all of it), else the git tree of the
    config's repository; None when there is neither (only llaunch is frozen then). Uncommitted changes are refused
    unless allow_dirty: a job must be reproducible from the commit its status names."""
    if code_dir is not None:
        root = Path(code_dir).expanduser()
        if not root.is_dir():
            raise LaunchError(f"--code {code_dir} is not a directory; pass the directory of the code the job imports.")
        tree = git_tree(root.resolve()) or plain_tree(root.resolve())
    else:
        top = _git(Path(config_path).resolve().parent, "rev-parse", "--show-toplevel")
        if top is None:
            return None
        tree = git_tree(Path(top.strip()))
    if tree.uncommitted and not allow_dirty:
        shown = ", ".join(tree.uncommitted[:3]) + (", ..." if len(tree.uncommitted) > 3 else "")
        raise LaunchError(f"{tree.root} has uncommitted changes ({len(tree.uncommitted)} file(s): {shown}); commit "
                          f"them, or pass --allow-dirty to run them as they are (the job dir keeps their diff).")
    size = sum((tree.root / name).lstat().st_size for name in tree.files)
    if size > MAX_CODE_BYTES:
        largest = max(tree.files, key=lambda name: (tree.root / name).lstat().st_size)
        raise LaunchError(f"the code to freeze in {tree.root} is {format_bytes(size)}, more than "
                          f"{format_bytes(MAX_CODE_BYTES)} (the largest file: {largest}); pass --code DIR with only "
                          f"the code the job imports, or keep data and weights out of git.")
    return tree


def llaunch_tree() -> CodeTree:
    """llaunch's packages as this process imports them, with the commit of the checkout they are in (if any)."""
    root = Path(LLAUNCH_SOURCE)
    tree = plain_tree(root, LLAUNCH_PACKAGES)
    if (_git(root, "rev-parse", "--show-toplevel") or "").strip() != str(root):  # e.g. a venv inside a repository
        return tree
    commit = (_git(root, "rev-parse", "--verify", "-q", "HEAD") or "").strip() or None
    changed = _names(_git(root, "diff", "HEAD", "--name-only", "-z", "--", *LLAUNCH_PACKAGES)) if commit else ()
    new = _names(_git(root, "ls-files", "--others", "--exclude-standard", "-z", "--", *LLAUNCH_PACKAGES))
    return CodeTree(root, tree.files, commit, tuple(sorted({*changed, *new})), in_git=True)


def torch_cuda() -> str | None:
    """The CUDA version torch was built with (None: a CPU build, or no torch), read from torch/version.py as text:
    the launcher side never imports torch."""
    spec = util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        tree = ast.parse(Path(spec.submodule_search_locations[0], "version.py").read_text())
    except (OSError, SyntaxError):
        return None
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and target.id == "cuda" and node.value is not None:
            value = ast.literal_eval(node.value)
            return str(value) if value is not None else None
    return None


def environment() -> dict:
    """This interpreter's python, torch and torch's CUDA, and every installed package's version (names as PEP 503
    normalizes them), from package metadata: what the doctor compares a node's with."""
    packages = {re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower(): dist.version
                for dist in metadata.distributions() if dist.metadata["Name"]}
    return {"python": platform.python_version(), "executable": sys.executable, "torch": packages.get("torch"),
            "cuda": torch_cuda(), "packages": dict(sorted(packages.items()))}


def pip_freeze() -> str:
    """`pip freeze` of this interpreter; where pip is missing (a uv venv), the packages metadata lists."""
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True, timeout=120)
        if done.returncode == 0:
            return done.stdout
    except (OSError, subprocess.TimeoutExpired):
        pass
    listed = environment()["packages"]
    return "# pip is not installed here; the packages importlib.metadata lists:\n" + "".join(
        f"{name}=={version}\n" for name, version in listed.items())


@dataclass(frozen=True)
class FrozenCode:
    """The code one submitted job runs from: where it goes in the job dir, what the job's processes import (in
    order) and where they start."""

    job_dir: Path
    user: CodeTree | None
    inherited_pythonpath: str = ""  # the submitter's PYTHONPATH: its other entries stay after the snapshot's

    @property
    def folder(self) -> Path:
        return JobDir(self.job_dir).code

    @property
    def import_roots(self) -> list[str]:
        return [str(self.folder / USER)] * (self.user is not None) + [str(self.folder / LLAUNCH)]

    @property
    def roots_path(self) -> str:
        """The snapshot's roots alone, as PYTHONPATH: what a container's python imports."""
        return os.pathsep.join(self.import_roots)

    @property
    def workdir(self) -> str:
        return self.import_roots[0]

    def pythonpath(self) -> str:
        """The snapshot's roots, then the submitter's other entries (absolute) but the checkouts it replaces."""
        replaced = {str(Path(LLAUNCH_SOURCE).resolve())} | ({str(self.user.root)} if self.user else set())
        rest = [str(Path(entry).resolve()) for entry in self.inherited_pythonpath.split(os.pathsep) if entry]
        return os.pathsep.join(dict.fromkeys(self.import_roots + [p for p in rest if p not in replaced]))

    def sbatch_lines(self) -> list[str]:
        """The script's first lines: every node and every requeue starts in the snapshot and imports from it."""
        return [f"cd {shlex.quote(self.workdir)}", f"export {PYTHONPATH.name}={shlex.quote(self.pythonpath())}"]

    def in_script(self, params: dict) -> dict:
        """submitit's parameters with these lines before the profile's setup (and a container's exports)."""
        return {**params, "setup": self.sbatch_lines() + list(params.get("setup", []))}

    def describe(self) -> str:
        where = f"{self.user.root} @ {_short(self.user.commit)}" if self.user else "llaunch only (the config is in no " \
                                                                                   "git repository; --code DIR adds yours)"
        dirty = f" with {len(self.user.uncommitted)} uncommitted file(s)" if self.user and self.user.uncommitted else ""
        return f"code frozen into {self.folder}: {where}{dirty}"

    def freeze(self, container_image: str | None = None) -> dict:
        """Copy the trees and write the records into a partial folder, then rename it into place (replacing an
        ended job's snapshot); returns the manifest."""
        partial = self.folder.with_name(f".{self.folder.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            manifest = {"created": time.time(), "llaunch": _copy(llaunch_tree(), partial / LLAUNCH),
                        "user": _copy(self.user, partial / USER) if self.user else None,
                        "container": container_image, **environment()}
            if self.user and self.user.uncommitted:
                (partial / DIFF).write_bytes(_diff(self.user.root))
                manifest["user"]["diff"] = str(self.folder / DIFF)
            (partial / FREEZE).write_text(pip_freeze())
            write_text_atomic(partial / MANIFEST, json.dumps(manifest, indent=1))
            if self.folder.is_dir():
                shutil.rmtree(self.folder)
            partial.rename(self.folder)
        except OSError as err:
            shutil.rmtree(partial, ignore_errors=True)
            raise LaunchError(f"cannot freeze the job's code into {self.folder} ({err.strerror or err}); free space "
                              f"there or fix its permissions.") from None
        return manifest


def _short(commit: str | None) -> str:
    return commit[:12] if commit else "no commit"


def _diff(root: Path) -> bytes:
    return (_git(root, "diff", "HEAD", "--binary", "--relative", "--", ".") or "").encode("utf-8", "surrogateescape")


def _copy(tree: CodeTree, dest: Path) -> dict:
    """The tree's files under dest (symlinks as links, as git stores them); its record."""
    for name in tree.files:
        source, target = tree.root / name, dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            os.symlink(os.readlink(source), target)
        else:
            shutil.copy2(source, target)
    return tree.record()


def recorded(job_dir: str | Path) -> dict | None:
    """The job's snapshot.json; None when the job has no frozen code (`llaunch run`, an older submit)."""
    try:
        return json.loads((JobDir(job_dir).code / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def recorded_environment(job_dir: str | Path) -> dict | None:
    """The environment `llaunch submit` recorded (and the container the job runs in); None without a snapshot."""
    manifest = recorded(job_dir)
    return None if manifest is None else {key: manifest.get(key) for key in ("python", "torch", "cuda", "packages",
                                                                              "container")}


def status_line(job_dir: str | Path) -> str | None:
    """`llaunch status`'s line: the commit the job runs (the user's code and llaunch's)."""
    manifest = recorded(job_dir)
    if manifest is None:
        return None
    parts = []
    user = manifest.get("user")
    if user:
        dirty = f" + {len(user['uncommitted'])} uncommitted file(s) ({user['diff']})" if user.get("diff") else ""
        parts.append(f"{user['root']} @ {_short(user['commit'])}{dirty}" if user["in_git"] else f"{user['root']}")
    own = manifest["llaunch"]
    changed = f" + {len(own['uncommitted'])} uncommitted file(s)" if own.get("uncommitted") else ""
    parts.append(f"llaunch @ {_short(own['commit'])}{changed}" if own["in_git"] else f"llaunch from {own['root']}")
    return f"code: {'; '.join(parts)} (frozen in {JobDir(job_dir).code})"
