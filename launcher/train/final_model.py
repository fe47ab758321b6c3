"""DIR/final: the trained model as a Hugging Face folder (safetensors, config, tokenizer), replaced whole."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch.distributed as dist

from launcher.errors import LaunchError
from launcher.train.adapters import save_pretrained
from launcher.train.checkpoint import error_summary
from launcher.train.modeling import tied_parameter_names


def write_final_model(engine, tokenizer, final: Path, rank: int) -> None:
    """Every rank gathers the weights; rank 0 writes them beside `final` and swaps the folder in, so a failed
    write (a full disk) leaves the earlier final model where it was; every rank raises the same sentence."""
    state = engine.full_state_dict()
    for alias in tied_parameter_names(engine.module):
        state.pop(alias, None)
    error = [""]
    if rank == 0:
        tmp, old = (final.with_name(f"{final.name}.{suffix}") for suffix in ("tmp", "old"))
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            engine.module.config.use_cache = True
            save_pretrained(engine.module, tmp, state)
            tokenizer.save_pretrained(tmp)
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
            print(f"saved {final}", flush=True)
        except Exception as err:  # a full disk reaches us as OSError, or safetensors' and torch's own errors
            shutil.rmtree(tmp, ignore_errors=True)
            if old.exists() and not final.exists():
                old.rename(final)  # the earlier final model stays where it was
            error[0] = (f"could not write the final model to {final} ({error_summary(err)}); free space or "
                        f"fix permissions and rerun: it resumes from the last checkpoint.")
    dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise LaunchError(error[0])
