"""Pretraining data: text files -> (trained) tokenizer -> token cache -> packed blocks -> resumable batches.

The cache's layout and the packing are torch-free, in launcher/corpus.py; this side builds the cache (with
transformers' tokenizers) and reads batches from it. Sampling is a seeded permutation per epoch, addressed by
(epoch, position), which is all a checkpoint needs to resume on the exact next batch.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from launcher import env
from launcher.config import DataSection
from launcher.corpus import PackedBlocks, TokenizedCorpus, cache_key, cache_root, collect_text_files, tokenizer_source
from launcher.errors import LaunchError

EOS_TOKEN = "<|endoftext|>"


def read_texts(files: list[Path], max_bytes: int | None) -> list[str]:
    """File contents in order, stopping once max_bytes of text have been read."""
    texts, total = [], 0
    for path in files:
        text = _decode_text(path)
        if not text.strip():
            continue
        texts.append(text)
        total += len(text.encode("utf-8"))
        if max_bytes is not None and total >= max_bytes:
            break
    return texts


def _decode_text(path: Path) -> str:
    """UTF-8 text, a few stray bytes replaced; a binary file (NUL bytes, or over 1% undecodable) is refused."""
    data = path.read_bytes()
    text = data.decode("utf-8", errors="replace")
    undecodable = text.count("\ufffd") - data.count("\ufffd".encode())
    if b"\0" in data or undecodable > len(text) // 100:
        raise LaunchError(f"data file {path} is binary, not text; remove it from data.train_files or narrow "
                          f"data.file_pattern.")
    return text


def build_corpus(config: DataSection, model_dir: str | None = None) -> TokenizedCorpus:
    """Tokenize (training a tokenizer if needed) into the cache, or return the existing cache entry."""
    files = collect_text_files(config)
    source = tokenizer_source(config, model_dir)
    final = cache_root(config) / cache_key(config, files, source)
    if (final / "meta.json").exists():
        return TokenizedCorpus(final)
    texts = read_texts(files, config.max_train_bytes)
    if not texts:
        raise LaunchError(f"the data files ({len(files)} of them) hold no text; point data.train_files at text.")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    except OSError as err:
        raise _cache_unwritable(final.parent, err) from None
    try:
        tokenizer = _train_bpe(texts, config.vocab_size) if source.startswith("bpe:") else load_tokenizer(source)
        tokenizer.save_pretrained(work / "tokenizer")
        if tokenizer.eos_token_id is None:
            raise LaunchError(f"tokenizer {source} has no end-of-text token; use a tokenizer with an eos_token.")
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.uint32
        flat = np.fromiter(
            (t for doc in ids for t in (*doc, tokenizer.eos_token_id)), dtype=dtype, count=sum(len(d) + 1 for d in ids)
        )
        np.save(work / "tokens.npy", flat)
        meta = {"files": len(files), "documents": len(texts), "tokens": int(flat.size), "tokenizer": source,
                "vocab_size": len(tokenizer)}
        (work / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            work.rename(final)  # atomic: a concurrent builder that won the race leaves its copy in place
        except OSError:
            shutil.rmtree(work, ignore_errors=True)
    except BaseException as err:
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(err, OSError):  # a full disk while the tokens are written
            raise _cache_unwritable(final.parent, err) from None
        raise
    return TokenizedCorpus(final)


def _cache_unwritable(directory: Path, err: OSError) -> LaunchError:
    return LaunchError(f"cannot write the token cache in {directory} ({err.strerror or err}); set data.cache_dir "
                       f"or {env.CACHE.name} to a writable directory with free space.")


def _train_bpe(texts: list[str], vocab_size: int):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                   unk_token=EOS_TOKEN, pad_token=EOS_TOKEN)


def load_tokenizer(source: str | Path):
    from transformers import AutoTokenizer

    if not Path(source).exists():
        raise LaunchError(f"tokenizer {source} is not a local directory; llaunch downloads nothing at run time.")
    return AutoTokenizer.from_pretrained(source)


class PackedText:
    """Pretraining data as the loop takes it (launcher/train/training_data.py): the cached corpus cut into
    blocks; every block is a full sample, every next token a label."""

    def __init__(self, corpus: TokenizedCorpus, seq_len: int, validation_split_percentage: float):
        self.corpus = corpus
        self.blocks = PackedBlocks(corpus.tokens(), seq_len, validation_split_percentage)
        self.tokenizer_dir = corpus.tokenizer_dir

    @property
    def num_train(self) -> int:
        return self.blocks.num_train

    @property
    def num_eval(self) -> int:
        return self.blocks.num_eval

    def tokenizer(self):
        return load_tokenizer(self.tokenizer_dir)

    def check(self, global_batch: int) -> None:
        self.blocks.check(global_batch)

    def batch(self, split: str, indices: np.ndarray) -> dict[str, np.ndarray]:
        block = self.blocks.train_block if split == "train" else self.blocks.eval_block
        rows = np.stack([block(int(i)) for i in indices])
        return {"input_ids": rows, "labels": rows}

    def label_count(self, split: str, indices: np.ndarray) -> int:
        return len(indices) * (self.blocks.block_size - 1)

    def tokens(self) -> np.ndarray:
        return self.corpus.tokens()

    def epoch_order(self, global_batch: int, seed: int, group_by_length: bool):
        return None  # every block has the same length: nothing to group


class StepSampler:
    """Which training samples each optimizer step uses: a seeded permutation per epoch, drop-last.

    The global batch of step k is perm[position : position + global_batch]; rank r takes its contiguous
    share, split into micro-batches. Hence micro_batch x accumulation factorisations of the same global
    batch see the same samples, and (epoch, position) fully determines the next batch. `order(epoch)`, when
    given, replaces the plain shuffle (SFT's group_by_length).
    """

    def __init__(self, num_samples: int, global_batch: int, seed: int,
                 order: Callable[[int], np.ndarray] | None = None):
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.seed = seed
        self._order = order or (lambda epoch: np.random.default_rng([seed, epoch]).permutation(num_samples))
        self._epoch_cached: int | None = None
        self._perm: np.ndarray | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def permutation(self, epoch: int) -> np.ndarray:
        if self._epoch_cached != epoch:
            self._perm = self._order(epoch)
            self._epoch_cached = epoch
        return self._perm

    def next_step(self, epoch: int, position: int) -> tuple[np.ndarray, int, int]:
        """(indices of this step's global batch, epoch after it, position after it)."""
        if position + self.global_batch > self.num_samples:
            epoch, position = epoch + 1, 0
        indices = self.permutation(epoch)[position:position + self.global_batch]
        return indices, epoch, position + self.global_batch


def rank_micro_batches(indices: np.ndarray, rank: int, world_size: int, micro_batch: int) -> list[np.ndarray]:
    """This rank's contiguous share of a global batch, as a list of micro-batches."""
    per_rank = len(indices) // world_size
    mine = indices[rank * per_rank:(rank + 1) * per_rank]
    return [mine[i:i + micro_batch] for i in range(0, per_rank, micro_batch)]
