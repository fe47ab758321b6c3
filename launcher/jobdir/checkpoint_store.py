"""A run's checkpoint folder as files: names, manifests, listing, and which checkpoint a run resumes from.

Torch-free, so that the launcher side (`llaunch checkpoints`, `run`'s checks, the SLURM node task) reads
checkpoints without loading torch; launcher/train/checkpoint.py writes and loads them on the ranks.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from launcher.errors import LaunchError
from launcher.jobdir.layout import JobDir

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ENGINE_DIR = "engine"
MANIFEST_FORMAT = 1

def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def step_dir_name(step: int) -> str:
    return f"step-{step}"


def default_greater_is_better(metric_name: str) -> bool:
    """Hugging Face's rule: a metric is better when higher unless its name says it is a loss."""
    return not metric_name.endswith("loss")


@dataclass
class CheckpointInfo:
    """One folder under OUTPUT/checkpoints, as `llaunch checkpoints` shows it."""

    path: Path
    step: int
    complete: bool
    problem: str = ""
    created: str = ""
    size_bytes: int = 0
    metric_name: str = ""
    metric: float | None = None
    manifest: dict | None = None


def read_manifest(path: Path) -> dict | None:
    """The checkpoint's manifest, or None when it is missing, not JSON, or lacks what resume and export read."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT
            and isinstance(manifest.get("step"), int) and isinstance(manifest.get("world_size"), int)
            and manifest["world_size"] >= 1 and isinstance(manifest.get("strategy"), str)
            and isinstance(manifest.get("files"), dict)):
        return None
    files_ok = all(isinstance(meta, dict) and isinstance(meta.get("size"), int) and isinstance(meta.get("sha256"), str)
                   and not Path(rel).is_absolute() and ".." not in Path(rel).parts
                   for rel, meta in manifest["files"].items())
    metric = manifest.get("metric")
    metric_ok = metric is None or (isinstance(metric, dict) and isinstance(metric.get("value"), (int, float)))
    return manifest if files_ok and metric_ok else None


def sha256_all(files: list[Path]) -> list[str]:
    """Hash in parallel: hashlib releases the GIL, and a 1B-parameter checkpoint is over 10 GB."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        return list(pool.map(file_sha256, files))


def check_files(path: Path, manifest: dict, checksums: bool = True) -> str:
    """'' when every file in the manifest is present with its size (and checksum); else what is wrong."""
    for rel, meta in manifest["files"].items():
        file = Path(path) / rel
        try:
            size = file.stat().st_size
        except OSError:
            return f"{rel} is missing"
        if size != meta["size"]:
            return f"{rel} is truncated ({size} of {meta['size']} bytes)"
    if checksums:
        rels = list(manifest["files"])
        for rel, digest in zip(rels, sha256_all([Path(path) / rel for rel in rels])):
            if digest != manifest["files"][rel]["sha256"]:
                return f"{rel} is corrupted (sha256 mismatch)"
    return ""


def list_checkpoints(output_dir: str | Path, checksums: bool = False) -> list[CheckpointInfo]:
    """Every step-N folder, oldest first, each marked complete only if its manifest matches its files."""
    root = JobDir(output_dir).checkpoints
    infos = []
    for path in root.glob("step-*") if root.is_dir() else ():
        try:
            step = int(path.name.split("-", 1)[1])
        except ValueError:
            continue
        manifest = read_manifest(path)
        if manifest is None:
            infos.append(CheckpointInfo(path, step, complete=False, problem="no valid manifest (save did not finish, or it is damaged)"))
            continue
        problem = check_files(path, manifest, checksums)
        metric = manifest.get("metric") or {}
        infos.append(CheckpointInfo(
            path, step, complete=not problem, problem=problem, created=manifest.get("created", ""),
            size_bytes=sum(m["size"] for m in manifest["files"].values()),
            metric_name=metric.get("name", ""), metric=metric.get("value"), manifest=manifest,
        ))
    return sorted(infos, key=lambda info: info.step)


def best_checkpoint(infos: list[CheckpointInfo], greater_is_better: bool | None = None) -> CheckpointInfo | None:
    scored = [info for info in infos if info.complete and info.metric is not None]
    if not scored:
        return None
    greater = default_greater_is_better(scored[-1].metric_name) if greater_is_better is None else greater_is_better
    return (max if greater else min)(scored, key=lambda info: info.metric)


def find_latest_complete(output_dir: str | Path) -> Path | None:
    """The newest checkpoint whose every file matches its manifest; broken newer ones are named in a warning.

    None when there are no checkpoints. When there are some but every one is damaged, starting fresh would
    overwrite them, so that is refused and they are left for inspection.
    """
    problems = []
    for info in reversed(list_checkpoints(output_dir, checksums=False)):
        problem = info.problem or (check_files(info.path, info.manifest) if info.manifest else "")
        if not problem:
            return info.path
        problems.append(f"{info.path.name}: {problem}")
        log.warning("skipping checkpoint %s: %s; trying the previous one", info.path, problem)
    if problems:
        raise LaunchError(f"every checkpoint under {JobDir(output_dir).checkpoints} is damaged "
                          f"({'; '.join(problems[:3])}{'; ...' if len(problems) > 3 else ''}) and was left as it "
                          f"is; resume from a good copy with --resume-from, or start over them with --no-resume "
                          f"--overwrite.")
    return None


def verified_manifest(path: Path, if_incomplete: str, if_damaged: str) -> dict:
    """The manifest of a checkpoint whose files all match it (checksums included); otherwise one sentence
    ending in what to do instead."""
    manifest = read_manifest(path)
    if manifest is None:
        raise LaunchError(f"{path} is not a complete llaunch checkpoint (no valid {MANIFEST}); {if_incomplete}.")
    problem = check_files(path, manifest)
    if problem:
        raise LaunchError(f"checkpoint {path} is damaged ({problem}); {if_damaged}.")
    return manifest


def resolve_resume(output_dir: str | Path, resume_from: str | None, no_resume: bool, overwrite: bool) -> Path | None:
    """Which checkpoint a run starts from: --resume-from PATH, else the newest complete one, else none.

    `--no-resume` starts fresh, and refuses to do so over existing checkpoints (even damaged ones, which a
    fresh run would overwrite) without `--overwrite`.
    """
    if resume_from:
        path = Path(resume_from)
        verified_manifest(path, f"pick one listed by `llaunch checkpoints {output_dir}`", "resume from another one")
        return path
    if no_resume:
        if list_checkpoints(output_dir) and not overwrite:
            raise LaunchError(f"{output_dir} already holds checkpoints; add --overwrite to start fresh over "
                              f"them, or drop --no-resume to continue.")
        return None
    return find_latest_complete(output_dir)
