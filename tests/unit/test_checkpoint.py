"""Checkpoints are published only when complete, found by manifest, verified, retained safely (one process)."""

from __future__ import annotations

import errno
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from launcher.jobdir.checkpoint_store import file_sha256, find_latest_complete, list_checkpoints, resolve_resume
from launcher.errors import LaunchError
from launcher.train import checkpoint as ckpt
from launcher.train.checkpoint import Checkpointer
from launcher.train.fingerprint import Fingerprint


class TinyEngine:
    """The engine contract with DCP, in one process: what engines/base.py TorchEngine does."""

    def __init__(self, seed=0):
        torch.manual_seed(seed)
        self.module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=1e-2)
        self.fail_with: OSError | None = None

    def train_one_step(self):
        self.module(torch.randn(4, 8)).pow(2).mean().backward()
        self.optimizer.step()
        self.optimizer.zero_grad()

    def _state(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.module, self.optimizer)
        return {"model": model, "optimizer": optim}

    def save_state(self, directory, async_save=False):
        import torch.distributed.checkpoint as dcp

        if self.fail_with is not None:
            Path(directory).mkdir(parents=True)
            (Path(directory) / "half-written").write_bytes(b"x" * 100)
            raise self.fail_with
        dcp.save(self._state(), checkpoint_id=str(directory), no_dist=True)

    def load_state(self, directory):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=str(directory), no_dist=True)
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def fingerprint(**changes):
    base = dict(model_config={"hidden_size": 8}, tokenizer="tok", data="data", global_batch=8,
                schedule={"max_steps": 100})
    return Fingerprint.build(**{**base, **changes})


def save(checkpointer, engine, step, metric=None):
    return checkpointer.save(step, engine, {"train_state": {"global_step": step}}, fingerprint=fingerprint(),
                             metrics={"eval_loss": metric} if metric is not None else None,
                             documents={"config.yaml": "seed: 1\n"})


def test_checkpoint_has_manifest_with_sizes_and_checksums(tmp_path):
    engine = TinyEngine()
    path = save(Checkpointer(tmp_path, strategy="ddp"), engine, 5)
    manifest = json.loads((path / "manifest.json").read_text())
    assert path == tmp_path / "checkpoints" / "step-5"
    assert manifest["step"] == 5 and manifest["world_size"] == 1 and manifest["strategy"] == "ddp"
    assert {"rank-0.pt", "config.yaml", "engine/.metadata"} <= set(manifest["files"])
    for rel, meta in manifest["files"].items():
        assert (path / rel).stat().st_size == meta["size"] and len(meta["sha256"]) == 64
    assert manifest["fingerprint"]["data"] == "data"
    assert not list((tmp_path / "checkpoints").glob(".step-*"))


def test_resume_restores_weights_optimizer_and_every_rng_stream(tmp_path):
    engine = TinyEngine()
    engine.train_one_step()
    checkpointer = Checkpointer(tmp_path, strategy="ddp")
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    save(checkpointer, engine, 1)
    expected_draws = (random.random(), np.random.rand(), torch.rand(1).item())
    engine.train_one_step()
    expected_weights = [p.detach().clone() for p in engine.module.parameters()]

    fresh = TinyEngine(seed=99)
    state = checkpointer.load(tmp_path / "checkpoints" / "step-1", fresh)
    assert state["train_state"] == {"global_step": 1}
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected_draws
    fresh.train_one_step()  # needs the restored Adam moments to land on the same weights
    for got, want in zip(fresh.module.parameters(), expected_weights):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_unfinished_save_is_ignored_and_cleaned_by_the_next_save(tmp_path):
    engine = TinyEngine()
    checkpointer = Checkpointer(tmp_path, strategy="ddp")
    save(checkpointer, engine, 10)
    partial = tmp_path / "checkpoints" / ".step-20.partial"  # what kill -9 during a save leaves
    partial.mkdir()
    (partial / "rank-0.pt").write_bytes(b"half")
    no_manifest = tmp_path / "checkpoints" / "step-30"  # a folder with a higher number but no manifest
    no_manifest.mkdir()
    assert find_latest_complete(tmp_path) == tmp_path / "checkpoints" / "step-10"
    assert [i.complete for i in list_checkpoints(tmp_path)] == [True, False]
    save(checkpointer, engine, 20)
    assert not partial.exists()
    assert find_latest_complete(tmp_path) == tmp_path / "checkpoints" / "step-20"


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_shard_is_named_and_previous_checkpoint_used(tmp_path, caplog, damage):
    engine = TinyEngine()
    checkpointer = Checkpointer(tmp_path, strategy="ddp")
    save(checkpointer, engine, 1)
    engine.train_one_step()
    newest = save(checkpointer, engine, 2)
    shard = next((newest / "engine").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(bytes(data[:-10]))
    else:
        shard.unlink()
    with caplog.at_level(logging.WARNING):
        assert find_latest_complete(tmp_path) == tmp_path / "checkpoints" / "step-1"
    word = {"flip": "corrupted", "truncate": "truncated", "delete": "missing"}[damage]
    assert f"engine/{shard.name} is {word}" in caplog.text
    with pytest.raises(LaunchError, match="damaged"):
        resolve_resume(tmp_path, str(newest), no_resume=False, overwrite=False)


def test_retention_keeps_newest_and_best_and_deletes_only_after_publishing(tmp_path):
    engine = TinyEngine()
    checkpointer = Checkpointer(tmp_path, strategy="ddp", save_total_limit=2, metric_for_best_model="eval_loss")
    for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5)]:
        save(checkpointer, engine, step, loss)
    assert [i.step for i in list_checkpoints(tmp_path)] == [2, 3, 4]  # 2 is the best (lowest loss)

    engine.fail_with = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(LaunchError, match="No space left on device.*earlier checkpoints are untouched"):
        save(checkpointer, engine, 5, 0.5)
    assert [i.step for i in list_checkpoints(tmp_path) if i.complete] == [2, 3, 4]
    assert not list((tmp_path / "checkpoints").glob(".step-*"))


def test_greater_is_better_metric_keeps_the_highest(tmp_path):
    engine = TinyEngine()
    checkpointer = Checkpointer(tmp_path, strategy="ddp", save_total_limit=1, metric_for_best_model="accuracy",
                                greater_is_better=True)
    for step, acc in [(1, 0.2), (2, 0.9), (3, 0.5)]:
        checkpointer.save(step, engine, {}, metrics={"eval_accuracy": acc})
    assert [i.step for i in list_checkpoints(tmp_path)] == [2, 3]


def test_unwritable_output_is_one_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(LaunchError, match="cannot write checkpoints to .*choose a writable --output-dir"):
        Checkpointer(blocker / "out", strategy="ddp")


def test_too_little_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    engine = TinyEngine()
    checkpointer = Checkpointer(tmp_path, strategy="ddp")
    save(checkpointer, engine, 1)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: type("U", (), {"free": 10})())
    with pytest.raises(LaunchError, match="GiB free under .* free space or lower save_total_limit"):
        save(checkpointer, engine, 2)
    assert [i.step for i in list_checkpoints(tmp_path)] == [1]


def test_saving_a_step_again_replaces_the_old_copy(tmp_path):
    engine = TinyEngine()
    checkpointer = Checkpointer(tmp_path, strategy="ddp")
    first = json.loads((save(checkpointer, engine, 7) / "manifest.json").read_text())
    engine.train_one_step()
    second = json.loads((save(checkpointer, engine, 7) / "manifest.json").read_text())
    assert first["files"]["rank-0.pt"] != second["files"]["rank-0.pt"] or \
        first["files"]["engine/__0_0.distcp"] != second["files"]["engine/__0_0.distcp"]
    assert find_latest_complete(tmp_path) == tmp_path / "checkpoints" / "step-7"


def test_resolve_resume_choices(tmp_path):
    assert resolve_resume(tmp_path, None, no_resume=False, overwrite=False) is None
    save(Checkpointer(tmp_path, strategy="ddp"), TinyEngine(), 3)
    assert resolve_resume(tmp_path, None, no_resume=False, overwrite=False) == tmp_path / "checkpoints" / "step-3"
    with pytest.raises(LaunchError, match="add --overwrite"):
        resolve_resume(tmp_path, None, no_resume=True, overwrite=False)
    assert resolve_resume(tmp_path, None, no_resume=True, overwrite=True) is None
    with pytest.raises(LaunchError, match="not a complete llaunch checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "nowhere"), no_resume=False, overwrite=False)


def test_corrupting_fingerprint_change_is_refused_benign_one_logged(tmp_path, caplog):
    engine = TinyEngine()
    checkpointer = Checkpointer(tmp_path, strategy="ddp")
    path = save(checkpointer, engine, 4)
    with pytest.raises(LaunchError, match="the training data differs"):
        checkpointer.load(path, engine, fingerprint(data="other-data"))
    with pytest.raises(LaunchError, match="the tokenizer differs"):
        checkpointer.load(path, engine, fingerprint(tokenizer="other"))
    with pytest.raises(LaunchError, match="the global batch size differs"):
        checkpointer.load(path, engine, fingerprint(global_batch=16))
    with pytest.raises(LaunchError, match="the model architecture differs"):
        checkpointer.load(path, engine, fingerprint(model_config={"hidden_size": 16}))
    with caplog.at_level(logging.WARNING):
        checkpointer.load(path, engine, fingerprint(schedule={"max_steps": 200}, model_config={
            "hidden_size": 8, "transformers_version": "9.9"}))
    assert "max_steps: 100 -> 200" in caplog.text


def test_strategy_change_rules(tmp_path):
    engine = TinyEngine()
    path = save(Checkpointer(tmp_path, strategy="ddp"), engine, 1)
    Checkpointer(tmp_path, strategy="fsdp").load(path, engine)  # DCP: DDP and FSDP share names
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["strategy"] = "zero3"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LaunchError, match="written by strategy zero3 .* --strategy zero3"):
        Checkpointer(tmp_path, strategy="fsdp").load(path, engine)
    manifest["world_size"] = 4
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LaunchError, match="saved by 4 ranks and this run has 1.*ds_to_universal"):
        Checkpointer(tmp_path, strategy="zero3").load(path, engine)


def test_checkpoints_cli_lists_step_size_completeness_and_best(tmp_path, capsys):
    from launcher.cli import main

    engine = TinyEngine()
    checkpointer = Checkpointer(tmp_path, strategy="ddp", metric_for_best_model="eval_loss")
    save(checkpointer, engine, 10, 2.0)
    save(checkpointer, engine, 20, 1.5)
    save(checkpointer, engine, 30, 1.8)
    (tmp_path / "checkpoints" / "step-40").mkdir()
    assert main(["checkpoints", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.startswith("│") and
            line.split("│")[1].strip().isdigit()}
    assert set(rows) == {"10", "20", "30", "40"}
    assert "best" in rows["20"] and "best" not in rows["30"]
    assert "resume" in rows["30"]
    assert "no" in rows["40"] and "yes" in rows["10"]
    assert main(["checkpoints", str(tmp_path / "missing")]) == 2

    shard = next((tmp_path / "checkpoints" / "step-10" / "engine").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[0] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["checkpoints", str(tmp_path), "--verify"]) == 1
    out = capsys.readouterr().out
    assert any(line.split("│")[1].strip() == "10" and "no" in line for line in out.splitlines() if line.startswith("│"))
    assert "2 of 4 checkpoints are damaged or incomplete: step-10, step-40" in " ".join(out.split())


def test_checkpoints_without_verify_calls_its_resume_point_unverified(tmp_path, capsys, monkeypatch):
    """A flipped byte keeps the size: only --verify may call that checkpoint a resume point, and it exits 1."""
    from launcher.cli import main

    monkeypatch.setenv("COLUMNS", "200")  # one table row per line

    checkpointer = Checkpointer(tmp_path, strategy="ddp")
    for step in (1, 2):
        newest = save(checkpointer, TinyEngine(), step)
    shard = next((newest / "engine").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[0] ^= 0xFF
    shard.write_bytes(bytes(data))

    def rows(out):
        return {line.split("│")[1].strip(): line for line in out.splitlines() if line.startswith("│")}

    assert main(["checkpoints", str(tmp_path)]) == 0
    assert "resume point (unverified)" in rows(capsys.readouterr().out)["2"]
    assert main(["checkpoints", str(tmp_path), "--verify"]) == 1
    verified = rows(capsys.readouterr().out)
    assert "resume point" in verified["1"] and "resume" not in verified["2"] and "no" in verified["2"]


@pytest.mark.parametrize("manifest", ['{"format": 1}', '{"format": 1, "step": 1, "strategy": "ddp", "world_size": 1, '
                                      '"files": {"../../etc/passwd": {"size": 1, "sha256": "x"}}}', "[1, 2]", "\x00\xff"])
def test_a_damaged_manifest_is_an_incomplete_checkpoint_not_a_traceback(tmp_path, capsys, manifest):
    from launcher.cli import main

    path = save(Checkpointer(tmp_path, strategy="ddp"), TinyEngine(), 1)
    (path / "manifest.json").write_text(manifest, encoding="latin-1")
    assert [info.complete for info in list_checkpoints(tmp_path)] == [False]
    assert main(["checkpoints", str(tmp_path), "--verify"]) == 1
    with pytest.raises(LaunchError, match="every checkpoint .* is damaged"):
        find_latest_complete(tmp_path)
    with pytest.raises(LaunchError, match="not a complete llaunch checkpoint"):
        resolve_resume(tmp_path, str(path), no_resume=False, overwrite=False)


def test_export_writes_a_hugging_face_model_from_a_dcp_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from launcher.cli import main

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    engine = TinyEngine()
    engine.module, engine.optimizer = model, torch.optim.AdamW(model.parameters())
    path = Checkpointer(tmp_path, strategy="fsdp").save(
        3, engine, {}, documents={"model_config.json": config.to_json_string(use_diff=False)})
    assert main(["export", str(path), "--to", str(tmp_path / "hf")]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    for (name, want), got in zip(model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    assert main(["export", str(path), "--to", str(tmp_path / "hf2"), "--merge"]) == 2  # no adapters to merge


def test_export_onto_a_full_disk_is_one_sentence_and_leaves_nothing(tmp_path):
    """The disk fills while the weights are written (a file-size limit makes the write fail as ENOSPC would,
    without root): exit 2, one sentence, and neither --to nor its partial folder stays."""
    import os
    import resource
    import signal
    import subprocess
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    engine = TinyEngine()
    engine.module = LlamaForCausalLM(config)
    engine.optimizer = torch.optim.AdamW(engine.module.parameters())
    path = Checkpointer(tmp_path / "run", strategy="ddp").save(
        1, engine, {}, documents={"model_config.json": config.to_json_string(use_diff=False)})

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (32 << 10, 32 << 10))

    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "launcher", "export", str(path), "--to", str(out / "hf")],
                         capture_output=True, text=True, preexec_fn=small_disk, env=os.environ, timeout=300)
    assert run.returncode == 2, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]  # after the libraries' warnings
    assert last.startswith("llaunch: error: could not write the model to") and "Traceback" not in run.stderr
    assert not out.exists() or not any(out.iterdir())


class BaseDirAsTokenizer:
    """What checkpoints held under tokenizer/ before the tokenizer was saved alone: an SFT run's whole base
    directory, its tokenizer beside its config and weights (here another model's), which export must not copy."""

    def __init__(self, config):
        self.config = config

    def save_pretrained(self, directory):
        from transformers import LlamaForCausalLM

        from examples.arithmetic import char_tokenizer

        char_tokenizer(["0123456789 +="]).save_pretrained(directory)
        LlamaForCausalLM(self.config).save_pretrained(directory)


def test_export_of_a_lora_checkpoint_writes_the_adapter_or_merges_it(tmp_path):
    import json as _json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from launcher.train.export import export_checkpoint

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # as after training: a non-zero update to merge
            torch.nn.init.normal_(param, std=0.5)
    engine = TinyEngine()
    engine.module, engine.optimizer = model, torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)
    adapter = _json.dumps(model.peft_config["default"].to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v))
    path = Checkpointer(tmp_path, strategy="ddp").save(
        1, engine, {}, documents={"model_config.json": config.to_json_string(use_diff=False),
                                  "adapter_config.json": adapter}, tokenizer=BaseDirAsTokenizer(config))
    assert export_checkpoint(path, tmp_path / "adapter").name == "adapter_model.safetensors"
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    export_checkpoint(path, tmp_path / "merged", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tokens = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens).logits, model.eval()(tokens).logits, rtol=1e-4, atol=1e-5)


def full_disk_in_dcp() -> BaseException:
    """What dcp.save raises on every rank when one rank's disk is full: a BaseException, not an Exception."""
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    return CheckpointException("save", {0: _wrap_exception(OSError(errno.ENOSPC, "No space left on device"))})


def test_full_disk_in_the_engine_save_is_one_sentence_and_cleans_its_partial(tmp_path):
    engine = TinyEngine()
    checkpointer = Checkpointer(tmp_path, strategy="ddp")
    save(checkpointer, engine, 1)
    engine.fail_with = full_disk_in_dcp()
    with pytest.raises(LaunchError, match=r"step-2 .*\(rank 0: No space left on device\).*untouched") as err:
        save(checkpointer, engine, 2)
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "checkpoints").glob(".step-*"))
    engine.fail_with = None  # space is back: the next save works, nothing to clean by hand
    save(checkpointer, engine, 2)
    assert find_latest_complete(tmp_path) == tmp_path / "checkpoints" / "step-2"


def test_full_disk_in_the_rank_state_is_one_sentence(tmp_path, monkeypatch):
    engine = TinyEngine()
    checkpointer = Checkpointer(tmp_path, strategy="ddp")

    def torch_save_on_a_full_disk(obj, f):
        f.write(b"PK")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")

    monkeypatch.setattr(ckpt.torch, "save", torch_save_on_a_full_disk)
    with pytest.raises(LaunchError, match="could not write checkpoint step-1 .*unexpected pos"):
        save(checkpointer, engine, 1)
    assert not list((tmp_path / "checkpoints").glob(".step-*"))


def test_a_stale_partial_does_not_block_the_next_save(tmp_path, monkeypatch):
    """The space check once ran before an earlier failed save's partial was cleared: every rerun stopped."""
    engine = TinyEngine()
    checkpointer = Checkpointer(tmp_path, strategy="ddp")
    size = sum(f.stat().st_size for f in save(checkpointer, engine, 1).rglob("*") if f.is_file())
    stale = tmp_path / "checkpoints" / ".step-2.partial"
    stale.mkdir()
    (stale / "rank-0.pt").write_bytes(b"x" * size)
    # The disk has room for one more checkpoint only once the stale partial is gone.
    monkeypatch.setattr(ckpt.shutil, "disk_usage",
                        lambda path: type("U", (), {"free": 0 if stale.exists() else 10 * size})())
    save(checkpointer, engine, 2)
    assert not stale.exists() and find_latest_complete(tmp_path) == tmp_path / "checkpoints" / "step-2"


class RunsCode:
    """What a malicious checkpoint carries: unpickling it calls Path.touch(marker)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def reseal(path):
    """Rewrite the manifest over the tampered files, as whoever hands over a checkpoint can."""
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"] = {rel: {"size": (path / rel).stat().st_size, "sha256": file_sha256(path / rel)}
                         for rel in manifest["files"]}
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("target", ["rank-0.pt", "engine/.metadata"])
def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path, target):
    """rank-R.pt was loaded with weights_only=False and DCP's .metadata is a pickle: both could run code."""
    import pickle

    path = save(Checkpointer(tmp_path, strategy="ddp"), TinyEngine(), 1)
    marker = tmp_path / "pwned"
    if target == "rank-0.pt":
        state = torch.load(path / target, weights_only=True)  # what llaunch writes loads safely
        torch.save({**state, "rng": RunsCode(marker)}, path / target)
    else:
        (path / target).write_bytes(pickle.dumps(RunsCode(marker)))
    reseal(path)
    with pytest.raises(LaunchError, match="could run code"):
        Checkpointer(tmp_path, strategy="ddp").load(path, TinyEngine())
    assert not marker.exists()


def test_export_refuses_a_checkpoint_whose_metadata_would_run_code(tmp_path, capsys):
    import pickle

    from launcher.cli import main

    path = save(Checkpointer(tmp_path, strategy="fsdp"), TinyEngine(), 1)
    (path / "engine" / ".metadata").write_bytes(pickle.dumps(RunsCode(tmp_path / "pwned")))
    reseal(path)
    assert main(["export", str(path), "--to", str(tmp_path / "hf")]) == 2
    assert "could run code" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "hf").exists()


def test_export_of_a_checkpoint_with_truncated_metadata_is_one_sentence(tmp_path, capsys):
    from launcher.cli import main

    path = save(Checkpointer(tmp_path, strategy="fsdp"), TinyEngine(), 1)
    metadata = path / "engine" / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:40])
    reseal(path)
    assert main(["export", str(path), "--to", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert ".metadata is damaged" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "hf").exists() and not (tmp_path / ".hf.partial").exists()
