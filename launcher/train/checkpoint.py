"""Sharded checkpoints that are either complete or ignored, and discovery of the newest complete one.

A checkpoint is written into `checkpoints/.step-N.partial/`, fsynced, given a manifest (world size,
strategy, step, every file with its size and sha256, the resume fingerprint), and only then renamed to
`checkpoints/step-N/`. A folder without a valid manifest is never resumed from, so a crash, a `kill -9`
or a full disk in the middle of a save leaves the previous checkpoint as the newest usable one.
Retention deletes old checkpoints only after the new one is published, and never the best one.

Layout of one checkpoint:
    step-N/engine/        the engine's sharded model + optimizer state (DCP files, or DeepSpeed's own)
    step-N/rank-R.pt      per-rank state: RNG streams, train state, sampler, scheduler, scaler, early stop
    step-N/plan.yaml, config.yaml, model_config.json, tokenizer/   what export and resume need
    step-N/manifest.json  written last: the checkpoint is complete when it exists and matches the files
"""

from __future__ import annotations

import concurrent.futures
import datetime
import hashlib
import json
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from launcher.errors import LaunchError
from launcher.train.fingerprint import Fingerprint
from launcher.train.rng import capture_rng_state, restore_rng_state

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
MANIFEST = "manifest.json"
ENGINE_DIR = "engine"
MANIFEST_FORMAT = 1
# Strategies whose engine state is a DCP checkpoint: DCP reshards it to any world size, and DDP and FSDP
# write the same fully-qualified names, so either can resume the other.
DCP_STRATEGIES = ("ddp", "fsdp")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    if _world() > 1:
        dist.barrier()


def _broadcast(value):
    """Rank 0's value on every rank."""
    if _world() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


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
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT else None


def _sha256_all(files: list[Path]) -> list[str]:
    """Hash in parallel: hashlib releases the GIL, and a 1B-parameter checkpoint is over 10 GB."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        return list(pool.map(_sha256, files))


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
        for rel, digest in zip(rels, _sha256_all([Path(path) / rel for rel in rels])):
            if digest != manifest["files"][rel]["sha256"]:
                return f"{rel} is corrupted (sha256 mismatch)"
    return ""


def list_checkpoints(output_dir: str | Path, checksums: bool = False) -> list[CheckpointInfo]:
    """Every step-N folder, oldest first, each marked complete only if its manifest matches its files."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    infos = []
    for path in root.glob("step-*") if root.is_dir() else ():
        try:
            step = int(path.name.split("-", 1)[1])
        except ValueError:
            continue
        manifest = read_manifest(path)
        if manifest is None:
            infos.append(CheckpointInfo(path, step, complete=False, problem="no manifest (save did not finish)"))
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

    Call it on every rank: rank 0 verifies the checksums and broadcasts its choice.
    """
    chosen = None
    if _rank() == 0:
        for info in reversed(list_checkpoints(output_dir, checksums=False)):
            problem = info.problem or (check_files(info.path, info.manifest) if info.manifest else "")
            if not problem:
                chosen = str(info.path)
                break
            log.warning("skipping checkpoint %s: %s; trying the previous one", info.path, problem)
    chosen = _broadcast(chosen)
    return Path(chosen) if chosen else None


def resolve_resume(output_dir: str | Path, resume_from: str | None, no_resume: bool, overwrite: bool) -> Path | None:
    """Which checkpoint a run starts from: --resume-from PATH, else the newest complete one, else none.

    `--no-resume` starts fresh, and refuses to do so over existing checkpoints without `--overwrite`.
    """
    if resume_from:
        path = Path(resume_from)
        manifest = read_manifest(path)
        if manifest is None:
            raise LaunchError(f"{path} is not a complete llaunch checkpoint (no valid {MANIFEST}); "
                              f"pick one listed by `llaunch checkpoints {output_dir}`.")
        problem = check_files(path, manifest) if _rank() == 0 else ""
        problem = _broadcast(problem)
        if problem:
            raise LaunchError(f"checkpoint {path} is damaged ({problem}); resume from another one.")
        return path
    if no_resume:
        if any(info.complete for info in list_checkpoints(output_dir)) and not overwrite:
            raise LaunchError(f"{output_dir} already holds checkpoints; add --overwrite to start fresh over "
                              f"them, or drop --no-resume to continue.")
        return None
    return find_latest_complete(output_dir)


class Checkpointer:
    """Saves and loads checkpoints for one run. Every method is called on every rank.

    The engine does the sharded model + optimizer part with `save_state(dir, async_save) -> Future | None`
    and `load_state(dir)`; everything else (atomicity, manifest, RNG, retention) is here, once.
    With `async_save`, `save()` returns once the engine has copied its state to host memory; the files are
    written and the checkpoint published in the background, and `wait()` (called by the next save and at
    exit) joins it.
    """

    def __init__(self, output_dir: str | Path, *, strategy: str, save_total_limit: int | None = None,
                 metric_for_best_model: str | None = None, greater_is_better: bool | None = None,
                 async_save: bool = False):
        self.root = Path(output_dir) / CHECKPOINTS_DIR
        self.strategy = strategy
        self.save_total_limit = save_total_limit
        self.metric_for_best_model = metric_for_best_model
        self.greater_is_better = greater_is_better
        self.async_save = async_save
        self._pending: concurrent.futures.Future | None = None
        self._check_writable()

    def _check_writable(self) -> None:
        error = ""
        if _rank() == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                probe = self.root / f".write-test-{os.getpid()}"
                _write_durable(probe, b"ok")
                probe.unlink()
            except OSError as err:
                error = f"cannot write checkpoints to {self.root} ({err.strerror or err}); " \
                        f"choose a writable --output-dir."
        error = _broadcast(error)
        if error:
            raise LaunchError(error)

    # ---- save -------------------------------------------------------------------------------------------

    def save(self, step: int, engine, state: dict, *, fingerprint: Fingerprint | None = None,
             metrics: dict | None = None, documents: dict[str, str] | None = None,
             tokenizer_dir: str | Path | None = None) -> Path:
        """Write checkpoint `step`; returns its final path (published now, or by `wait()` when async).

        `state` is this rank's resumable state (train state, sampler, scheduler, scaler, early stopping);
        RNG streams are added here. `documents` (name -> text: plan.yaml, config.yaml, model_config.json)
        and `tokenizer_dir` are written by rank 0 for export and inspection.
        """
        self.wait()
        final = self.root / step_dir_name(step)
        partial = self.root / f".{step_dir_name(step)}.partial"
        self._check_space()
        rank = _rank()
        error = ""
        if rank == 0:
            try:
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)
            except OSError as err:
                error = f"{err.strerror or err}"
        error = self._agree_on_error(error)  # also the barrier: the folder exists before any rank writes
        if error:
            raise self._write_failed(f"step-{step}", error)
        try:
            payload = {"rng": capture_rng_state(), **state}
            with open(partial / f"rank-{rank}.pt", "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            if rank == 0:
                for name, text in (documents or {}).items():
                    _write_durable(partial / name, text.encode())
                if tokenizer_dir:
                    shutil.copytree(tokenizer_dir, partial / "tokenizer")
        except OSError as err:
            error = f"{err.strerror or err}"
        error = self._agree_on_error(error)
        if error:
            self._abandon(partial)
            raise self._write_failed(f"step-{step}", error)
        try:
            future = engine.save_state(partial / ENGINE_DIR, async_save=self.async_save)
        except Exception as err:  # DCP gathers every rank's write errors and raises the same on all ranks
            self._abandon(partial)
            raise self._write_failed(f"step-{step}", _first_line(err)) from None
        manifest = {
            "format": MANIFEST_FORMAT, "step": step, "strategy": self.strategy, "world_size": _world(),
            "fingerprint": fingerprint.to_dict() if fingerprint else None, "metric": self._metric(metrics),
        }
        if future is None:
            _barrier()  # every rank's files are on disk before rank 0 lists and hashes them
            error = ""
            if rank == 0:
                try:
                    self._publish(partial, final, manifest)
                except LaunchError as err:
                    error = str(err)
            error = self._agree_on_error(error)  # no rank trains on (or waits) while rank 0 failed
            if error:
                raise LaunchError(error)
            return final
        self._pending = self._spawn(self._finish_async, future, partial, final, manifest)
        return final

    def wait(self) -> None:
        """Join a background save; re-raise its failure as one sentence.

        Ends in a barrier, so no rank exits (and makes torchrun stop the others) while rank 0 still publishes.
        """
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.result()
            finally:
                _barrier()

    def _spawn(self, fn, *args) -> concurrent.futures.Future:
        result: concurrent.futures.Future = concurrent.futures.Future()

        def run():
            try:
                result.set_result(fn(*args))
            except BaseException as err:  # surfaced by wait() on the training thread
                result.set_exception(err)

        threading.Thread(target=run, name="llaunch-checkpoint", daemon=True).start()
        return result

    def _finish_async(self, future, partial: Path, final: Path, manifest: dict) -> None:
        try:
            future.result()
        except Exception as err:
            if _rank() == 0:
                self._abandon(partial)
            raise self._write_failed(final.name, _first_line(err)) from None
        # DCP's coordinator (rank 0) finishes only after every rank reported its writes, so rank 0 may publish.
        if _rank() == 0:
            self._publish(partial, final, manifest)

    def _publish(self, partial: Path, final: Path, manifest: dict) -> None:
        """Rank 0: fsync and hash every file, write the manifest last, rename into place, apply retention."""
        try:
            paths = sorted(p for p in partial.rglob("*") if p.is_file())
            for file in paths:
                _fsync_path(file)
            files = {file.relative_to(partial).as_posix(): {"size": file.stat().st_size, "sha256": digest}
                     for file, digest in zip(paths, _sha256_all(paths))}
            manifest = {**manifest, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "files": files}
            _write_durable(partial / MANIFEST, json.dumps(manifest, indent=1).encode())
            for directory in [partial, *(p for p in partial.rglob("*") if p.is_dir())]:
                _fsync_path(directory)
            stale = None
            if final.exists():  # an earlier, damaged or unfinished save of the same step
                stale = final.with_name(f".{final.name}.stale")
                shutil.rmtree(stale, ignore_errors=True)
                final.rename(stale)
            partial.rename(final)
            _fsync_path(self.root)
            if stale is not None:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError as err:
            self._abandon(partial)
            raise self._write_failed(final.name, err.strerror or err) from None
        log.info("saved checkpoint %s", final)
        self._apply_retention(keep=final)

    def _apply_retention(self, keep: Path) -> None:
        for leftover in self.root.glob(".step-*"):  # partial saves killed earlier, and stale copies
            shutil.rmtree(leftover, ignore_errors=True)
        if not self.save_total_limit or self.save_total_limit < 1:
            return
        complete = [info for info in list_checkpoints(self.root.parent) if info.complete]
        best = best_checkpoint(complete, self.greater_is_better)
        protected = {keep, best.path if best else None}
        newest = {info.path for info in complete[-self.save_total_limit:]}
        for info in complete:
            if info.path not in newest and info.path not in protected:
                log.info("deleting old checkpoint %s (save_total_limit=%d)", info.path, self.save_total_limit)
                shutil.rmtree(info.path, ignore_errors=True)

    def _metric(self, metrics: dict | None) -> dict | None:
        if not self.metric_for_best_model or not metrics:
            return None
        name = self.metric_for_best_model
        value = metrics.get(name, metrics.get(f"eval_{name}"))
        return None if value is None else {"name": name, "value": float(value)}

    def _check_space(self) -> None:
        """Refuse before writing when the disk cannot hold another checkpoint the size of the last one."""
        error = ""
        if _rank() == 0:
            previous = [info for info in list_checkpoints(self.root.parent) if info.complete]
            if previous:
                needed = previous[-1].size_bytes
                free = shutil.disk_usage(self.root).free
                if free < needed:
                    error = (f"only {free / 2**30:.1f} GiB free under {self.root} but a checkpoint takes "
                             f"{needed / 2**30:.1f} GiB; free space or lower save_total_limit.")
        error = _broadcast(error)
        if error:
            raise LaunchError(error)

    def _agree_on_error(self, error: str) -> str:
        """Every rank learns whether any rank failed, so none is left waiting in the engine's collectives."""
        if _world() == 1:
            return error
        errors = [None] * _world()
        dist.all_gather_object(errors, error)
        return next((e for e in errors if e), "")

    def _write_failed(self, name: str, reason) -> LaunchError:
        return LaunchError(f"could not write checkpoint {name} under {self.root} ({reason}); free space or fix "
                           f"permissions; earlier checkpoints are untouched.")

    @staticmethod
    def _abandon(partial: Path) -> None:
        shutil.rmtree(partial, ignore_errors=True)

    # ---- load -------------------------------------------------------------------------------------------

    def load(self, path: str | Path, engine, fingerprint: Fingerprint | None = None) -> dict:
        """Restore engine state and RNG from `path`; return this rank's saved state for the loop."""
        path = Path(path)
        manifest = read_manifest(path)
        if manifest is None:
            raise LaunchError(f"{path} is not a complete llaunch checkpoint; pick another with `llaunch checkpoints`.")
        saved_strategy, saved_world = manifest["strategy"], manifest["world_size"]
        if fingerprint is not None and manifest.get("fingerprint"):
            fingerprint.check_resume(Fingerprint.from_dict(manifest["fingerprint"]), str(path))
        if saved_strategy in DCP_STRATEGIES and self.strategy in DCP_STRATEGIES:
            if saved_world != _world():
                log.warning("resharding checkpoint %s from %d to %d ranks", path, saved_world, _world())
        elif saved_strategy != self.strategy:
            raise LaunchError(f"checkpoint {path} was written by strategy {saved_strategy} and cannot be resumed "
                              f"with {self.strategy}; run with --strategy {saved_strategy}.")
        elif saved_world != _world():
            raise LaunchError(
                f"DeepSpeed checkpoint {path} was saved by {saved_world} ranks and this run has {_world()}; run with "
                f"{saved_world} ranks, or convert it with `python -m deepspeed.checkpoint.ds_to_universal` and "
                f"load that universal checkpoint with DeepSpeed's `load_universal_checkpoint`."
            )
        engine.load_state(path / ENGINE_DIR)
        rank_file = path / f"rank-{_rank() % saved_world}.pt"
        state = torch.load(rank_file, map_location="cpu", weights_only=False)
        if saved_world != _world():
            log.warning("the checkpoint's per-rank RNG streams belong to another world size; rank %d continues "
                        "rank %d's streams", _rank(), _rank() % saved_world)
        restore_rng_state(state["rng"])
        log.info("resumed from checkpoint %s (step %d)", path, manifest["step"])
        return state


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else err.__class__.__name__
