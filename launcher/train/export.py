"""Turn any strategy's sharded checkpoint into one Hugging Face model folder (safetensors).

DCP checkpoints (DDP, FSDP, HSDP) are read shard by shard into full tensors of the model's keys only (the
optimizer state is never loaded); DeepSpeed ZeRO checkpoints go through DeepSpeed's own zero_to_fp32.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from launcher.errors import LaunchError
from launcher.checkpoint_store import ENGINE_DIR, verified_manifest
from launcher.plan import DEEPSPEED_STRATEGIES
from launcher.train.trusted_pickle import check_dcp_metadata

MODEL_KEY = "model"  # engines save DCP state as {"model": ..., "optimizer": ...}


def _load_dcp_model_state(engine_dir: Path) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    check_dcp_metadata(engine_dir)  # before DCP unpickles it
    metadata = dcp.FileSystemReader(str(engine_dir)).read_metadata()
    prefix = MODEL_KEY + "."
    model: dict[str, torch.Tensor] = {}
    for key, meta in metadata.state_dict_metadata.items():
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata):
            model[key[len(prefix):]] = torch.empty(meta.size, dtype=meta.properties.dtype)
    if not model:
        raise LaunchError(f"{engine_dir} holds no model weights under '{MODEL_KEY}'; it is not an llaunch checkpoint.")
    dcp.load({MODEL_KEY: model}, checkpoint_id=str(engine_dir), no_dist=True)
    return model


def _load_deepspeed_model_state(engine_dir: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tags = sorted({p.parent.name for p in engine_dir.glob("*/*model_states.pt")})
    if len(tags) != 1:
        raise LaunchError(f"{engine_dir} does not hold exactly one DeepSpeed checkpoint tag; it is damaged.")
    return get_fp32_state_dict_from_zero_checkpoint(str(engine_dir), tag=tags[0])


def load_model_state(checkpoint: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Full fp32 (or saved-dtype) model weights and the manifest of a complete checkpoint."""
    checkpoint = Path(checkpoint)
    manifest = verified_manifest(checkpoint, "list usable ones with `llaunch checkpoints OUTPUT`",
                                 "export another one")
    engine_dir = checkpoint / ENGINE_DIR
    if manifest["strategy"] in DEEPSPEED_STRATEGIES:
        return _load_deepspeed_model_state(engine_dir), manifest
    return _load_dcp_model_state(engine_dir), manifest


def export_checkpoint(checkpoint: str | Path, to: str | Path, merge: bool = False) -> Path:
    """Write `to/model.safetensors` (+ config.json and tokenizer when the checkpoint has them).

    A LoRA run's checkpoint exports as its adapter (adapter_model.safetensors), or with `merge` as the base
    model with the adapter folded into its weights.
    """
    from safetensors.torch import save_file

    checkpoint, to = Path(checkpoint), Path(to)
    state, manifest = load_model_state(checkpoint)
    config_file = checkpoint / "model_config.json"
    adapter_file = checkpoint / "adapter_config.json"
    if merge and not adapter_file.exists():
        raise LaunchError(f"checkpoint {checkpoint} has no LoRA adapters to merge; drop --merge.")
    to.mkdir(parents=True, exist_ok=True)
    if config_file.exists():
        model = _build_hf_model(json.loads(config_file.read_text()), state,
                                json.loads(adapter_file.read_text()) if adapter_file.exists() else None, merge)
        model.save_pretrained(to, safe_serialization=True)
        if adapter_file.exists() and not merge:
            return to / "adapter_model.safetensors"
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(to / "model.safetensors"),
                  metadata={"step": str(manifest["step"])})
    tokenizer = checkpoint / "tokenizer"
    if tokenizer.is_dir():
        shutil.copytree(tokenizer, to, dirs_exist_ok=True)
    return to / "model.safetensors"


def _build_hf_model(config: dict, state: dict[str, torch.Tensor], adapter: dict | None, merge: bool):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = config.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, **config)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(hf_config)
    if adapter is not None:
        from peft import get_peft_config, get_peft_model

        model = get_peft_model(model, get_peft_config(adapter))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not _is_tied(model, k)]
    if missing or unexpected:
        raise LaunchError(f"checkpoint weights do not match its model config ({len(missing)} missing, "
                          f"{len(unexpected)} unexpected, e.g. {(missing or unexpected)[0]}); it cannot be exported.")
    model.tie_weights()
    if adapter is not None and merge:
        model = model.merge_and_unload()
    return model


def _is_tied(model, key: str) -> bool:
    tied = getattr(model, "_tied_weights_keys", None) or []
    tied = tied.keys() if isinstance(tied, dict) else tied
    return getattr(model.config, "tie_word_embeddings", False) and any(key.endswith(t) for t in tied)
