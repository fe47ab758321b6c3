"""Refuse a DCP checkpoint whose `.metadata` pickle could run code, before DCP unpickles it.

DCP stores its index (`engine/.metadata`) with pickle, and `pickle.load` calls whatever the file names.
A checkpoint from elsewhere (`--resume-from`, a shared directory, `llaunch export`) is first read here by
an unpickler that only builds the few classes DCP writes (its metadata dataclasses, torch sizes, dtypes and
layouts, paths); anything else is one sentence and nothing is loaded.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from launcher.errors import LaunchError

DCP_METADATA = ".metadata"
_ALLOWED = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"),
}
_METADATA_MODULE = "torch.distributed.checkpoint.metadata"


class _ForeignGlobal(pickle.UnpicklingError):
    """The pickle names a callable outside DCP's metadata classes."""


class _DCPMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        is_metadata_class = module == _METADATA_MODULE and isinstance(
            getattr(__import__(module, fromlist=[name]), name, None), type)
        if (module, name) in _ALLOWED or is_dtype or is_metadata_class:
            return super().find_class(module, name)
        raise _ForeignGlobal(f"{module}.{name}")


def check_dcp_metadata(engine_dir: str | Path) -> None:
    """Raise LaunchError unless engine_dir/.metadata holds only what DCP itself writes."""
    path = Path(engine_dir) / DCP_METADATA
    try:
        with open(path, "rb") as f:
            _DCPMetadataUnpickler(f).load()
    except OSError as err:
        raise LaunchError(f"cannot read {path} ({err.strerror or err}); pick another checkpoint.") from None
    except _ForeignGlobal as err:
        raise LaunchError(f"{path} refers to {err}, which DCP never writes, so loading it could run code; "
                          f"llaunch will not load this checkpoint (use only checkpoints you trust).") from None
    except Exception as err:  # truncated or flipped bytes: UnpicklingError, EOFError, ValueError, KeyError, ...
        raise LaunchError(f"{path} is damaged ({err.__class__.__name__}); pick another checkpoint.") from None
