"""The one interface between the training loop and its data, and the one function that builds it.

Pretraining text (launcher/train/data.py: PackedText) and SFT JSONL (launcher/train/sft.py: SFTCorpus) both
implement it, so the loop never asks which kind it has. `llaunch run` (launcher/jobdir/prepare.py) builds it once to
check the data before any rank starts, which also fills the token cache the ranks then read.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from launcher.config import TrainConfig

SPLITS = ("train", "eval")


class TrainingData(Protocol):
    """Train and eval samples addressed by index, so the loop's seeded, resumable sampler serves any format."""

    tokenizer_dir: Path  # copied into every checkpoint and the final model

    @property
    def num_train(self) -> int: ...

    @property
    def num_eval(self) -> int: ...

    def tokenizer(self): ...

    def check(self, global_batch: int) -> None:
        """LaunchError when the data cannot fill one optimizer step."""

    def batch(self, split: str, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The model's keyword arguments (input_ids, labels, and position_ids for packed examples) as int64
        arrays of shape (len(indices), length)."""

    def label_count(self, split: str, indices: np.ndarray) -> int:
        """Tokens the loss of these samples averages over (labels that are learned, after the shift)."""

    def tokens(self) -> np.ndarray:
        """Every training token id in sample order: what the resume fingerprint digests."""

    def epoch_order(self, global_batch: int, seed: int, group_by_length: bool) -> Callable[[int], np.ndarray] | None:
        """Each epoch's sample order, when it is not the sampler's plain seeded shuffle."""


def load_training_data(config: TrainConfig, seq_len: int, build: bool = True) -> TrainingData | None:
    """The run's data for samples of `seq_len` tokens. Tokenized text is cached: with build=False a rank
    only reads the cache and gets None while there is none yet (it waits for the rank that builds it)."""
    from launcher.planning.models import pretrained_dir

    model_dir = pretrained_dir(config.model.name_or_path)
    if config.data.dataset_format == "text":
        from launcher.corpus import find_corpus
        from launcher.train.data import PackedText, build_corpus

        corpus = build_corpus(config.data, model_dir) if build else find_corpus(config.data, model_dir)
        return PackedText(corpus, seq_len, config.data.validation_split_percentage) if corpus else None
    from launcher.train.sft import SFTCorpus

    return SFTCorpus.from_config(config.data, model_dir, seq_len, config.training.seed)
