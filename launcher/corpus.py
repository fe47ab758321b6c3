"""The token cache of a text corpus, torch-free: which files the corpus is, which tokenizer it takes, where its
tokens are cached and what they hold, and how they pack into blocks.

The launcher reads it to plan (a tokenizer trained on the corpus sets the vocabulary) and to check that the data
fills a global batch, without loading torch; the ranks' side (launcher/train/data.py) builds the cache, training
the tokenizer, and reads batches from it. Tokenizing is done once per (files, sizes, mtimes, tokenizer), so
every rank and every later run only memory-maps a `.npy`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from launcher import env
from launcher.config import DataSection
from launcher.errors import LaunchError

CACHE_FORMAT = 1
STDLIB = "@stdlib"
INSTALLED_PACKAGES = {"site-packages", "dist-packages"}


def cache_root(config: DataSection) -> Path:
    return env.cache_root(config.cache_dir) / "datasets"


def stdlib_dir() -> Path:
    """This Python's standard library: text every machine with llaunch has (the quickstart's corpus)."""
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"])


def collect_text_files(config: DataSection) -> list[Path]:
    """Every file named or found (by file_pattern) under the named directories, sorted for determinism.

    The entry `@stdlib` names the standard library's directory (installed packages excluded).
    """
    if not config.train_files:
        raise LaunchError("data.train_files is empty; name at least one text file or directory.")
    files: list[Path] = []
    for entry in config.train_files:
        path = stdlib_dir() if entry == STDLIB else Path(entry).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob(config.file_pattern)
                           if p.is_file() and not INSTALLED_PACKAGES.intersection(p.relative_to(path).parts))
            if not found:
                raise LaunchError(f"data directory {path} holds no file matching {config.file_pattern!r}; "
                                  "set data.file_pattern.")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise LaunchError(f"data path {path} does not exist; fix data.train_files.")
    return files


def cache_key(config: DataSection, files: list[Path], tokenizer_source: str) -> str:
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    blob = json.dumps(
        {"format": CACHE_FORMAT, "files": stats, "max_bytes": config.max_train_bytes, "tokenizer": tokenizer_source},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tokenizer_source(config: DataSection, model_dir: str | None) -> str:
    """Where the tokenizer comes from: the config's, the pretrained model's, or a BPE trained on the data."""
    if config.tokenizer_name_or_path:
        return config.tokenizer_name_or_path
    if model_dir and any(Path(model_dir, f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return str(model_dir)
    return f"bpe:{config.vocab_size}"


@dataclass
class TokenizedCorpus:
    """A cache directory holding tokenizer/ and tokens.npy (all documents, each followed by EOS)."""

    path: Path

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    def tokens(self) -> np.ndarray:
        return np.load(self.path / "tokens.npy", mmap_mode="r")

    @property
    def meta(self) -> dict:
        return json.loads((self.path / "meta.json").read_text())


def find_corpus(config: DataSection, model_dir: str | None = None) -> TokenizedCorpus | None:
    files = collect_text_files(config)
    path = cache_root(config) / cache_key(config, files, tokenizer_source(config, model_dir))
    return TokenizedCorpus(path) if (path / "meta.json").exists() else None


@dataclass
class PackedBlocks:
    """Fixed-length blocks cut from the token stream; the tail `eval_blocks` are held out for evaluation."""

    tokens: np.ndarray
    block_size: int
    validation_split_percentage: float

    @property
    def num_blocks(self) -> int:
        return len(self.tokens) // self.block_size

    @property
    def num_eval(self) -> int:
        if self.validation_split_percentage <= 0 or self.num_blocks < 2:
            return 0
        return max(1, round(self.num_blocks * self.validation_split_percentage / 100))

    @property
    def num_train(self) -> int:
        return self.num_blocks - self.num_eval

    def train_block(self, index: int) -> np.ndarray:
        return self._block(index)

    def eval_block(self, index: int) -> np.ndarray:
        return self._block(self.num_train + index)

    def _block(self, index: int) -> np.ndarray:
        start = index * self.block_size
        return np.asarray(self.tokens[start:start + self.block_size], dtype=np.int64)

    def check(self, global_batch: int) -> None:
        """Fail before launch when the data cannot fill one optimizer step."""
        if self.num_train < max(1, global_batch):
            raise LaunchError(
                f"the data gives {self.num_train} training blocks of {self.block_size} tokens "
                f"({len(self.tokens)} tokens), fewer than one global batch of {global_batch}; "
                "add text, or lower data.block_size or the batch size."
            )
