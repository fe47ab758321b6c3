"""What rank 0 does on its own (final model, run lock), checked on a one-process gloo group."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch.distributed as dist

from launcher.errors import LaunchError
from launcher import env
from launcher.jobdir.run_lock import RunLock
from launcher.train.distributed import init_distributed
from launcher.train.final_model import write_final_model
from launcher.train.loop import Trainer


@pytest.fixture
def process_group(monkeypatch):
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    init_distributed()
    yield
    dist.destroy_process_group()


def test_full_disk_in_the_final_save_keeps_the_earlier_model_and_no_tmp(tmp_path, process_group):
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "model.safetensors").write_bytes(b"earlier model")

    def save_pretrained(path, **kwargs):
        Path(path).mkdir(parents=True)
        (Path(path) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    module = SimpleNamespace(config=SimpleNamespace(use_cache=False), save_pretrained=save_pretrained,
                             named_parameters=lambda remove_duplicate: iter(()))
    engine = SimpleNamespace(full_state_dict=dict, module=module)
    with pytest.raises(LaunchError, match="could not write the final model .*No space left on device.*rerun"):
        write_final_model(engine, None, tmp_path / "final", rank=0)
    assert [p.name for p in tmp_path.iterdir()] == ["final"]
    assert (tmp_path / "final" / "model.safetensors").read_bytes() == b"earlier model"


def test_rank_zero_takes_the_run_lock_unless_its_launcher_holds_it_and_the_ranks_keep_it(tmp_path, process_group,
                                                                                        monkeypatch):
    """A SLURM job's ranks lock the directory themselves; under `llaunch run` the launcher already does, and the
    ranks join its lock: a rerun is refused while a rank lives, even once the launcher is gone."""
    other = RunLock.acquire(tmp_path)
    trainer = SimpleNamespace(rank=0, world_size=1, job_dir=tmp_path, run_lock=None)
    with pytest.raises(LaunchError, match="is in use by llaunch pid"):
        Trainer.take_run_lock(trainer)
    monkeypatch.setenv(env.RUN_LOCK_HELD.name, str(tmp_path.resolve()))
    Trainer.take_run_lock(trainer)
    other.release()  # the launcher is gone; its rank still holds the lock
    with pytest.raises(LaunchError, match=f"is in use by llaunch pid .* \\(its ranks: pid {os.getpid()}\\)"):
        RunLock.acquire(tmp_path)
    trainer.run_lock.release()
    monkeypatch.delenv(env.RUN_LOCK_HELD.name)
    Trainer.take_run_lock(trainer)
    assert trainer.run_lock is not None
    trainer.run_lock.release()
