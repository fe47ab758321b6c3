"""Sharded checkpoints that are either complete or ignored, written and loaded by every rank.

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
launcher/jobdir/checkpoint_store.py reads this layout as files (listing, manifests, which one to resume from).
"""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import logging
import os
import pickle
import re
import shutil
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from launcher.observe import event_ledger
from launcher.jobdir.checkpoint_store import (
    ENGINE_DIR, MANIFEST, MANIFEST_FORMAT, best_checkpoint, list_checkpoints, read_manifest,
    resolve_resume, sha256_all, step_dir_name,
)
from launcher.errors import LaunchError
from launcher.jobdir.layout import JobDir
from launcher.train.fingerprint import Fingerprint
from launcher.train.rng import capture_rng_state, restore_rng_state
from launcher.train.trusted_pickle import check_dcp_metadata

log = logging.getLogger(__name__)

# What a failed engine save raises: DCP gathers every rank's errors into a CheckpointException, which is a
# BaseException (not an Exception), so a full disk would otherwise escape as a traceback.
SAVE_ERRORS = (Exception, CheckpointException)
# Strategies whose engine state is a DCP checkpoint: DCP reshards it to any world size, and DDP and FSDP
# write the same fully-qualified names, so either can resume the other.
DCP_STRATEGIES = ("ddp", "fsdp", "hsdp")  # HSDP is FSDP2 on a 2-D mesh: FSDP's names, resharded alike


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


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def resolve_resume_on_every_rank(output_dir: str | Path, resume_from: str | None, no_resume: bool,
                                 overwrite: bool) -> Path | None:
    """`resolve_resume` decided by rank 0 (which verifies the checksums) and the same on every rank, its
    refusal included."""
    choice = None
    if _rank() == 0:
        try:
            choice = resolve_resume(output_dir, resume_from, no_resume, overwrite)
        except LaunchError as err:
            choice = err
    choice = _broadcast(choice)
    if isinstance(choice, LaunchError):
        raise choice
    return choice


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
        self.root = JobDir(output_dir).checkpoints
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
             tokenizer=None) -> Path:
        """Write checkpoint `step`; returns its final path (published now, or by `wait()` when async).

        `state` is this rank's resumable state (train state, sampler, scheduler, scaler, early stopping);
        RNG streams are added here. `documents` (name -> text: plan.yaml, config.yaml, model_config.json)
        and the `tokenizer` (its own files only: an SFT run's tokenizer comes from the base model's directory,
        whose weights a checkpoint must not repeat) are written by rank 0 for export and inspection.
        """
        self.wait()
        final = self.root / step_dir_name(step)
        partial = self.root / f".{step_dir_name(step)}.partial"
        # The folder exists (and the disk has room) before any rank writes into it.
        self._all_or_none(final.name, lambda: self._open_partial(step, partial), on_rank0_only=True)
        self._all_or_none(final.name, lambda: self._write_rank_files(partial, state, documents, tokenizer),
                          partial)
        try:
            future = engine.save_state(partial / ENGINE_DIR, async_save=self.async_save)
        except SAVE_ERRORS as err:  # DCP gathers every rank's write errors and raises the same on all ranks
            self._abandon(partial)
            raise self._write_failed(final.name, error_summary(err)) from None
        manifest = {
            "format": MANIFEST_FORMAT, "step": step, "strategy": self.strategy, "world_size": _world(),
            "fingerprint": fingerprint.to_dict() if fingerprint else None, "metric": self._metric(metrics),
        }
        if future is None:
            _barrier()  # every rank's files are on disk before rank 0 lists and hashes them
            # No rank trains on (or waits) while rank 0 failed to publish.
            self._all_or_none(final.name, lambda: self._publish(partial, final, manifest), on_rank0_only=True)
            return final
        self._async_started = time.time()
        self._pending = self._spawn(self._finish_async, future, partial, final, manifest)
        return final

    def _all_or_none(self, name: str, write, partial: Path | None = None, on_rank0_only: bool = False) -> None:
        """Run one part of a save (on every rank, or on rank 0 only) and make every rank raise the same
        sentence when any rank failed, so that none is left waiting in the next collective; a failed part
        takes `partial` with it."""
        error = ""
        if not on_rank0_only or _rank() == 0:
            try:
                write()
            except LaunchError as err:
                error = str(err)
            except (OSError, RuntimeError) as err:  # torch.save's zip writer reports a full disk as RuntimeError
                error = str(self._write_failed(name, error_summary(err)))
        error = self._agree_on_error(error)
        if error:
            if partial is not None:
                self._abandon(partial)
            raise LaunchError(error)

    def _open_partial(self, step: int, partial: Path) -> None:
        """Rank 0: clear what an interrupted or failed save left (so its space counts as free), check the
        space, make the folder."""
        for leftover in self.root.glob(".step-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        problem = self._space_problem()
        if problem:
            raise LaunchError(problem)
        try:
            partial.mkdir(parents=True)
        except OSError as err:
            raise self._write_failed(step_dir_name(step), err.strerror or err) from None

    def _write_rank_files(self, partial: Path, state: dict, documents: dict[str, str] | None,
                          tokenizer) -> None:
        """This rank's state with its RNG streams; rank 0 adds the documents and the tokenizer."""
        rank = _rank()
        with open(partial / f"rank-{rank}.pt", "wb") as f:
            torch.save({"rng": capture_rng_state(), **state}, f)
            f.flush()
            os.fsync(f.fileno())
        if rank == 0:
            for name, text in (documents or {}).items():
                _write_durable(partial / name, text.encode())
            if tokenizer is not None:
                tokenizer.save_pretrained(partial / "tokenizer")

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
        except SAVE_ERRORS as err:
            if _rank() == 0:
                self._abandon(partial)
            raise self._write_failed(final.name, error_summary(err)) from None
        # DCP's coordinator (rank 0) finishes only after every rank reported its writes, so rank 0 may publish.
        if _rank() == 0:
            self._publish(partial, final, manifest)
            event_ledger.append(self.root.parent, event_ledger.SAVE_BACKGROUND, step=manifest["step"],
                          seconds=time.time() - self._async_started)

    def _publish(self, partial: Path, final: Path, manifest: dict) -> None:
        """Rank 0: fsync and hash every file, write the manifest last, rename into place, apply retention."""
        try:
            paths = sorted(p for p in partial.rglob("*") if p.is_file())
            for file in paths:
                _fsync_path(file)
            files = {file.relative_to(partial).as_posix(): {"size": file.stat().st_size, "sha256": digest}
                     for file, digest in zip(paths, sha256_all(paths))}
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

    def _space_problem(self) -> str:
        """Rank 0: why the disk cannot hold another checkpoint the size of the last one ('' when it can)."""
        previous = [info for info in list_checkpoints(self.root.parent) if info.complete]
        if not previous:
            return ""
        needed, free = previous[-1].size_bytes, shutil.disk_usage(self.root).free
        if free >= needed:
            return ""
        return (f"only {free / 2**30:.1f} GiB free under {self.root} but a checkpoint takes {needed / 2**30:.1f} GiB; "
                f"free space or lower save_total_limit, then rerun to resume from the last checkpoint.")

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
        if saved_strategy in DCP_STRATEGIES:
            check_dcp_metadata(path / ENGINE_DIR)
        engine.load_state(path / ENGINE_DIR)
        rank_file = path / f"rank-{_rank() % saved_world}.pt"
        try:  # tensors and plain values only: a rank state never runs code when loaded
            state = torch.load(rank_file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
            raise LaunchError(f"{rank_file} holds more than tensors and plain values "
                              f"({found.group(1) if found else 'an object'}), so loading it could run code; llaunch "
                              f"will not load it (written by another program, or by an older llaunch).") from None
        if saved_world != _world():
            log.warning("the checkpoint's per-rank RNG streams belong to another world size; rank %d continues "
                        "rank %d's streams", _rank(), _rank() % saved_world)
        restore_rng_state(state["rng"])
        log.info("resumed from checkpoint %s (step %d)", path, manifest["step"])
        return state


def error_summary(err: BaseException) -> str:
    """An exception in a few words: an OSError's strerror (No space left on device), else its first line.

    DCP's CheckpointException wraps each failed rank's exception; the first one says what happened.
    """
    if isinstance(err, CheckpointException) and err.failures:
        return f"rank {next(iter(err.failures))}: {error_summary(next(iter(err.failures.values()))[0])}"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err).strip().splitlines()
    return text[0] if text else err.__class__.__name__
