"""Pretraining data: tokenized once and cached, packed, split, and sampled deterministically and resumably."""

from __future__ import annotations

import numpy as np
import pytest

from launcher.config import DataSection
from launcher.errors import LaunchError
from launcher.corpus import PackedBlocks, find_corpus
from launcher.train.data import StepSampler, build_corpus, load_tokenizer, rank_micro_batches


@pytest.fixture
def corpus_dir(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 40)
    (docs / "skip.md").write_text("not matched by the pattern")
    return docs


def data_config(tmp_path, paths, **kw):
    return DataSection(train_files=[str(p) for p in paths], vocab_size=300, cache_dir=str(tmp_path / "cache"), **kw)


def test_trains_a_bpe_tokenizer_and_caches_the_tokens(tmp_path, corpus_dir):
    config = data_config(tmp_path, [corpus_dir])
    assert find_corpus(config) is None
    corpus = build_corpus(config)
    tokenizer = load_tokenizer(corpus.tokenizer_dir)
    assert len(tokenizer) <= 300 and tokenizer.eos_token == "<|endoftext|>"
    tokens = corpus.tokens()
    assert corpus.meta["documents"] == 3  # skip.md is not *.txt
    assert int((tokens == tokenizer.eos_token_id).sum()) == 3  # one EOS after each document
    text = tokenizer.decode(np.asarray(tokens[: np.argmax(tokens == tokenizer.eos_token_id)]))
    assert text == (corpus_dir / "doc0.txt").read_text()  # byte-level BPE round-trips exactly
    assert find_corpus(config).path == corpus.path
    mtime = (corpus.path / "tokens.npy").stat().st_mtime_ns
    assert build_corpus(config).path == corpus.path
    assert (corpus.path / "tokens.npy").stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_changed_text_gets_a_new_cache_entry(tmp_path, corpus_dir):
    config = data_config(tmp_path, [corpus_dir])
    first = build_corpus(config)
    (corpus_dir / "doc1.txt").write_text("something else entirely " * 30)
    assert build_corpus(config).path != first.path


def test_max_train_bytes_limits_the_text(tmp_path, corpus_dir):
    corpus = build_corpus(data_config(tmp_path, [corpus_dir], max_train_bytes=10))
    assert corpus.meta["documents"] == 1


def test_missing_path_and_empty_data_fail_with_one_sentence(tmp_path):
    with pytest.raises(LaunchError, match="does not exist"):
        build_corpus(data_config(tmp_path, [tmp_path / "nope.txt"]))
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(LaunchError, match="hold no text"):
        build_corpus(data_config(tmp_path, [empty]))
    (tmp_path / "dir").mkdir()
    with pytest.raises(LaunchError, match="no file matching"):
        build_corpus(data_config(tmp_path, [tmp_path / "dir"]))


def test_stdlib_entry_finds_python_source(tmp_path):
    from launcher.corpus import collect_text_files

    files = collect_text_files(DataSection(train_files=["@stdlib"], file_pattern="*.py"))
    names = {f.name for f in files}
    assert "os.py" in names and "json" in {f.parent.name for f in files}
    assert not any("site-packages" in f.parts for f in files)


def test_packing_and_eval_split():
    blocks = PackedBlocks(np.arange(105), block_size=10, validation_split_percentage=20)
    assert blocks.num_blocks == 10 and blocks.num_eval == 2 and blocks.num_train == 8
    assert blocks.train_block(1).tolist() == list(range(10, 20))
    assert blocks.eval_block(0).tolist() == list(range(80, 90))  # held-out tail, never trained on
    with pytest.raises(LaunchError, match="fewer than one global batch"):
        blocks.check(global_batch=9)


def test_sampler_is_deterministic_and_resumes_from_epoch_and_position():
    def run(sampler, epoch, position, steps):
        out = []
        for _ in range(steps):
            indices, epoch, position = sampler.next_step(epoch, position)
            out.append(indices.tolist())
        return out, epoch, position

    straight, epoch, position = run(StepSampler(10, 4, seed=1), 0, 0, 5)
    assert (epoch, position) == (2, 4)  # 2 steps per epoch (drop last), reshuffled each epoch
    assert sorted(straight[0] + straight[1]) == sorted(set(straight[0] + straight[1]))
    assert straight[0] != straight[2]
    first, epoch, position = run(StepSampler(10, 4, seed=1), 0, 0, 3)
    rest, _, _ = run(StepSampler(10, 4, seed=1), epoch, position, 2)  # a fresh sampler, as after a restart
    assert first + rest == straight
    assert run(StepSampler(10, 4, seed=2), 0, 0, 1)[0] != straight[:1]


def test_micro_batch_factorisations_see_the_same_samples():
    indices = np.arange(16)
    two_by_two = rank_micro_batches(indices, rank=1, world_size=2, micro_batch=2)
    four = rank_micro_batches(indices, rank=1, world_size=2, micro_batch=4)
    assert [m.tolist() for m in two_by_two] == [[8, 9], [10, 11], [12, 13], [14, 15]]
    assert np.concatenate(two_by_two).tolist() == np.concatenate(four).tolist()
