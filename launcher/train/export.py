"""Turn any strategy's sharded checkpoint into one Hugging Face model folder (safetensors).

DCP checkpoints (DDP, FSDP, HSDP) are read shard by shard into full tensors of the model's keys only (the
optimizer state is never loaded); DeepSpeed ZeRO checkpoints go through DeepSpeed's own zero_to_fp32.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from launcher.errors import LaunchError
from launcher.jobdir.checkpoint_store import ENGINE_DIR, verified_manifest
from launcher.planning.plan import DEEPSPEED_STRATEGIES
from launcher.train.adapters import ADAPTER_CONFIG
from launcher.planning.models import pretrained_dir
from launcher.train.trusted_pickle import check_dcp_metadata

MODEL_KEY = "model"  # engines save DCP state as {"model": ..., "optimizer": ...}
BASE_DIR = "base"  # an exported adapter's random-init base, beside it


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


def export_checkpoint(checkpoint: str | Path, to: str | Path, merge: bool = False,
                      destination: str | Path | None = None) -> Path:
    """Write `to/model.safetensors` (+ config.json and tokenizer when the checkpoint has them).

    A LoRA run's checkpoint exports as its adapter in PEFT's format (see `_save_adapter`), or with `merge` as
    the base model with the adapter folded into its weights. `destination` is where `to` will be renamed to
    once complete (an adapter records its base's final path); by default `to` itself.
    """
    from safetensors.torch import save_file

    checkpoint, to = Path(checkpoint), Path(to)
    state, manifest = load_model_state(checkpoint)
    config_file = checkpoint / "model_config.json"
    adapter_file = checkpoint / ADAPTER_CONFIG
    if merge and not adapter_file.exists():
        raise LaunchError(f"checkpoint {checkpoint} has no LoRA adapters to merge; drop --merge.")
    to.mkdir(parents=True, exist_ok=True)
    written = to / "model.safetensors"
    if config_file.exists():
        adapter = json.loads(adapter_file.read_text()) if adapter_file.exists() else None
        model = _build_hf_model(json.loads(config_file.read_text()), state, adapter)
        if adapter is None or merge:
            (model.merge_and_unload() if adapter else model).save_pretrained(to, safe_serialization=True)
        else:
            written = _save_adapter(model, to, Path(destination or to))
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(written), metadata={"step": str(manifest["step"])})
    _save_tokenizer(checkpoint / "tokenizer", to)
    return written


def _save_tokenizer(source: Path, to: Path) -> None:
    """The tokenizer's own files: checkpoints older than Checkpointer's `tokenizer` argument hold an SFT run's
    whole base directory under tokenizer/, whose weights and config must not overwrite the exported ones."""
    from transformers import AutoTokenizer

    if source.is_dir():
        AutoTokenizer.from_pretrained(source).save_pretrained(to)


def _save_adapter(model, to: Path, destination: Path) -> Path:
    """The adapter alone (adapter_config.json + adapter_model.safetensors) and what loading it needs: its
    base_model_name_or_path is the local base it was trained on when that still holds weights; a random-init
    base (or one since removed) exists only in the checkpoint, so it is written to `base/` beside the adapter
    and recorded by its absolute path, which PEFT's AutoPeftModelForCausalLM and `llaunch generate` read."""
    config = model.peft_config["default"]
    recorded = config.base_model_name_or_path or ""
    if pretrained_dir(recorded) is None:
        config.base_model_name_or_path = str((destination / BASE_DIR).absolute())
        with warnings.catch_warnings():  # PEFT looks for the base's config.json, written next
            warnings.filterwarnings("ignore", message="Could not find a config file", category=UserWarning)
            model.save_pretrained(to, safe_serialization=True)
        model.base_model.delete_adapter("default")  # unload() then gives back the frozen modules, not their copies
        model.unload().save_pretrained(to / BASE_DIR, safe_serialization=True)
    else:
        model.save_pretrained(to, safe_serialization=True)
    return to / "adapter_model.safetensors"


def _build_hf_model(config: dict, state: dict[str, torch.Tensor], adapter: dict | None):
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
    return model


def _is_tied(model, key: str) -> bool:
    tied = getattr(model, "_tied_weights_keys", None) or []
    tied = tied.keys() if isinstance(tied, dict) else tied
    return getattr(model.config, "tie_word_embeddings", False) and any(key.endswith(t) for t in tied)
