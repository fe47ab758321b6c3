"""The resume fingerprint: what a checkpoint was trained on, compared with what a resume would train on.

Some changes make a resumed run silently wrong (other data, another tokenizer, another model shape,
another global batch, which moves every sample to a different step); those are refused. Others are a
user's deliberate choice (train for more steps, another learning rate); those are logged and allowed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from launcher.errors import LaunchError

log = logging.getLogger(__name__)

# Field -> what the user should do when it differs from the checkpoint's.
_CORRUPTING = {
    "model_config": "the model architecture",
    "tokenizer": "the tokenizer",
    "data": "the training data",
    "global_batch": "the global batch size",
}


def digest(value) -> str:
    """A short stable hash of any JSON-serialisable value (dict key order does not matter)."""
    blob = json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def files_digest(directory: str | Path) -> str:
    """Hash of every file's bytes under `directory` (a tokenizer folder), independent of where it lives."""
    h = hashlib.sha256()
    for file in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        h.update(file.relative_to(directory).as_posix().encode())
        h.update(file.read_bytes())
    return h.hexdigest()[:16]


def array_digest(array: np.ndarray, samples: int = 256, sample_len: int = 4096, **extra) -> str:
    """Hash of a (possibly memory-mapped, huge) token array: its length, dtype and 256 evenly spaced slices.

    Reading every token of a terabyte corpus at each resume would cost minutes; any re-tokenisation or other
    data changes the length or the sampled tokens. `extra` (block size, split, seed) enters the hash too.
    """
    h = hashlib.sha256(json.dumps({"n": int(array.size), "dtype": str(array.dtype), **extra}, sort_keys=True).encode())
    flat = array.reshape(-1)
    for start in np.linspace(0, max(0, flat.size - sample_len), num=min(samples, max(1, flat.size)), dtype=np.int64):
        h.update(np.ascontiguousarray(flat[start:start + sample_len]).tobytes())
    return h.hexdigest()[:16]


@dataclass
class Fingerprint:
    model_config: str = ""
    tokenizer: str = ""
    data: str = ""
    global_batch: int = 0
    schedule: dict = field(default_factory=dict)

    @classmethod
    def build(cls, *, model_config: dict, tokenizer: str, data: str, global_batch: int, schedule: dict) -> "Fingerprint":
        """`tokenizer` and `data` are already hashes (of the tokenizer file and the tokenized dataset)."""
        # Names and dtypes a user may legitimately change between runs do not define the architecture.
        ignored = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache", "architectures"}
        shape = {k: v for k, v in model_config.items() if k not in ignored}
        return cls(model_config=digest(shape), tokenizer=tokenizer, data=data, global_batch=int(global_batch),
                   schedule=dict(schedule))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Fingerprint":
        return cls(**data)

    def check_resume(self, saved: "Fingerprint", checkpoint: str) -> list[str]:
        """Raise LaunchError on a corrupting change; return one line per benign (schedule) change."""
        for name, what in _CORRUPTING.items():
            before, now = getattr(saved, name), getattr(self, name)
            if before and now and before != now:
                raise LaunchError(
                    f"{what} differs from the one checkpoint {checkpoint} was trained with "
                    f"({before} -> {now}); restore it, or start fresh with --no-resume --overwrite."
                )
        changes = []
        for key in sorted(set(saved.schedule) | set(self.schedule)):
            before, now = saved.schedule.get(key), self.schedule.get(key)
            if before != now:
                changes.append(f"{key}: {before} -> {now}")
        for change in changes:
            log.warning("resuming with a changed schedule (%s)", change)
        return changes
