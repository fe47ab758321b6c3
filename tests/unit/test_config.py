"""The train config rejects what a user gets wrong, with one sentence, before anything starts."""

from __future__ import annotations

import pytest

from launcher.cli import main
from launcher.config import TrainConfig, load_train_config
from launcher.errors import LaunchError


def write(tmp_path, text):
    path = tmp_path / "train.yaml"
    path.write_text(text)
    return path


def test_unknown_key_suggests_the_close_one(tmp_path):
    path = write(tmp_path, "training:\n  learning_rat: 1.0e-3\n")
    with pytest.raises(LaunchError, match="unknown key 'learning_rat'; did you mean 'learning_rate'"):
        load_train_config(path)


def test_unknown_section_suggests_the_close_one(tmp_path):
    with pytest.raises(LaunchError, match="did you mean 'training'"):
        load_train_config(write(tmp_path, "trainig:\n  seed: 1\n"))


@pytest.mark.parametrize("text, message", [
    ("training:\n  max_steps: ten\n", "training.max_steps must be an integer, not 'ten'"),
    ("training:\n  bf16: 1\n", "training.bf16 must be true or false, not 1"),
    ("data:\n  train_files: 3\n", "data.train_files must be a list"),
    ("model:\n  overrides: [1, 2]\n", "model.overrides must be a mapping"),
])
def test_wrong_types_are_rejected(tmp_path, text, message):
    with pytest.raises(LaunchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_train_config(write(tmp_path, text))


def test_overrides_are_typed_by_yaml_and_win(tmp_path):
    path = write(tmp_path, "training:\n  learning_rate: 1.0e-3\n")
    config = load_train_config(path, ["training.learning_rate=5e-4", "training.max_steps=7", "training.bf16=true",
                                      "data.train_files=corpus.txt"])
    assert config.training.learning_rate == 5e-4
    assert config.training.max_steps == 7
    assert config.requested_precision == "amp-bf16"
    assert config.data.train_files == [str(tmp_path / "corpus.txt")]  # relative to the config file


def test_int_widens_to_float_and_defaults_fill_in(tmp_path):
    config = load_train_config(write(tmp_path, "training:\n  learning_rate: 1\n  weight_decay: 1e-2\n"))
    assert config.training.learning_rate == 1.0 and isinstance(config.training.learning_rate, float)
    assert config.training.weight_decay == 0.01  # YAML 1.1 reads 1e-2 as text; a float field takes it
    assert config.training.lr_scheduler_type == "cosine"
    assert config.requested_precision is None  # the planner chooses


@pytest.mark.parametrize("item", ["learning_rate=1", "training.learning_rate", "a.b.c=1"])
def test_malformed_override(tmp_path, item):
    with pytest.raises(LaunchError, match="section.key=value"):
        load_train_config(write(tmp_path, ""), [item])


def test_save_and_load_round_trip(tmp_path):
    config = load_train_config(write(tmp_path, "data:\n  train_files: [a.txt]\ntraining:\n  fp16: true\n"))
    config.save(tmp_path / "saved.yaml")
    again = TrainConfig.load(tmp_path / "saved.yaml")
    assert again == config
    assert again.requested_precision == "amp-fp16"


def test_bf16_and_fp16_together_is_an_error(tmp_path):
    with pytest.raises(LaunchError, match="choose one"):
        load_train_config(write(tmp_path, "training:\n  bf16: true\n  fp16: true\n"))


def test_cli_prints_one_sentence_and_exits_2(tmp_path, capsys):
    path = write(tmp_path, "training:\n  warmup_ration: 0.1\n")
    assert main(["run", str(path), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llaunch: error:") and "did you mean 'warmup_ratio'" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_every_shipped_example_loads(tmp_path):
    from pathlib import Path

    examples = sorted(Path(__file__).resolve().parents[2].joinpath("examples").glob("*.yaml"))
    assert examples
    for path in examples:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and f"llaunch run examples/{path.name}" in first, \
            f"{path.name} must start with the command that runs it"
        load_train_config(path)


def test_a_full_disk_while_saving_the_config_leaves_no_tmp_file(tmp_path, monkeypatch):
    """A 0-byte config.yaml.tmp was left behind when the disk filled during the write."""
    import errno
    import os

    def fsync_on_a_full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync_on_a_full_disk)
    with pytest.raises(LaunchError, match=r"cannot write .*config.yaml \(No space left on device\)"):
        TrainConfig().save(tmp_path / "config.yaml")
    assert list(tmp_path.iterdir()) == []
