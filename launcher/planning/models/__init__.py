"""Model specs: the architecture facts the estimator and planner need, from an alias, catalog, HF cache or path.

Catalog entries are published config.json facts (JSON files in catalog/, each with its source). Every model
type in families.py (dense Llama / Mistral / Qwen2-3 / Gemma 3, the Mixtral / Qwen3-MoE / DeepSeek-V3 / gpt-oss
mixtures of experts, GPT-2) is counted analytically, catalog entry or local config.json, so that
`llaunch plan --model 70b` never imports torch; anything else is instantiated on the meta device (accelerate's
init_empty_weights) and counted exactly.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from functools import lru_cache
from pathlib import Path

from launcher.errors import LaunchError
from launcher.planning.models.families import FAMILIES, decoder_spec, gpt2_spec
from launcher.planning.models.spec import GPT2_LIKE, MLASpec, ModelSpec, MoESpec

__all__ = ["MLASpec", "ModelSpec", "MoESpec", "count_params_on_meta", "load_model_spec", "pretrained_dir",
           "spec_from_config"]

CATALOG_DIR = Path(__file__).with_name("catalog")
CONFIG_KEYS_FILE = Path(__file__).parents[1] / "data" / "config_keys.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def pretrained_dir(name_or_path: str) -> Path | None:
    """The local directory holding weights, if the model is named by one (else it is random-init)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() and any((path / f).exists() for f in WEIGHT_FILES):
        return path
    return None


def load_model_spec(name_or_path: str, overrides: dict | None = None) -> ModelSpec:
    """Resolve an alias, catalog name, local HF-cache id, model directory or config.json path. Offline."""
    overrides = dict(overrides or {})
    key = str(name_or_path).strip()
    entry = _catalog_entry(key)
    if entry is not None:
        config = _overridden(entry["name"], entry["hf_config"], overrides)
        spec = spec_from_config(entry["name"], config, source=entry["source"])
        if not overrides:
            spec.published_params = entry.get("published_params")
        return spec
    config_path = _find_config_json(key)
    if config_path is None:
        close = difflib.get_close_matches(key.lower(), sorted(_catalog_names()), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"known models include {', '.join(sorted(_aliases()))}."
        raise LaunchError(
            f"unknown model {key!r} (not an alias, catalog name, cached HF id or local path); {hint}"
        )
    config = _overridden(key, _read_config_json(config_path), overrides)
    return spec_from_config(key, config, source=str(config_path))


@lru_cache(maxsize=1)
def _config_keys() -> dict[str, list[str]]:
    return json.loads(CONFIG_KEYS_FILE.read_text())["keys"]


def _overridden(name: str, config: dict, overrides: dict) -> dict:
    """config with overrides applied, each one checked: a key the model type's config knows (transformers would
    set an unknown one and ignore it), the same model type, and a value of the kind it replaces (a positive count
    stays a positive count, a number stays finite). Keys are checked for the model types in CONFIG_KEYS_FILE."""
    known = _config_keys().get(config.get("model_type"))
    for key, value in overrides.items():
        if known is not None and key not in config and key not in known:
            close = difflib.get_close_matches(str(key), [*config, *known], n=1)
            hint = f"did you mean {close[0]}?" if close else "see the model's Hugging Face config class."
            raise LaunchError(f"model override {key!r} is not a key of a {config['model_type']} config ({name}); {hint}")
        if key not in config:
            continue
        old = config[key]
        if key == "model_type" and value != old:
            raise LaunchError(f"model override model_type={value} would turn {name} ({old}) into another kind of "
                              f"model; pick a model of type {value} instead.")
        if isinstance(old, bool):
            ok = isinstance(value, bool)
        elif isinstance(old, int):
            ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 1 or old < 1)
        elif isinstance(old, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        else:
            ok = True
        if not ok:
            kind = {bool: "true or false", int: "a positive integer" if old >= 1 else "an integer",
                    float: "a finite number"}[type(old)]
            raise LaunchError(f"model override {key}={value!r} for {name} must be {kind} (it was {old!r}).")
    return {**config, **overrides}


@lru_cache(maxsize=1)
def _catalog() -> dict[str, dict]:
    entries = {}
    for path in sorted(CATALOG_DIR.glob("*.json")):
        entry = json.loads(path.read_text())
        entries[entry["name"]] = entry
    return entries


@lru_cache(maxsize=1)
def _aliases() -> dict[str, str]:
    return {alias: name for name, e in _catalog().items() for alias in e["aliases"]}


def _catalog_names() -> set[str]:
    return set(_catalog()) | set(_aliases())


def _catalog_entry(key: str) -> dict | None:
    lowered = key.lower()
    name = _aliases().get(lowered, lowered)
    return _catalog().get(name)


def _hf_cache_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    dirs.append(home / "hub")
    return dirs


def _find_config_json(key: str) -> Path | None:
    path = Path(key).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / "config.json").is_file():
            return path / "config.json"
        raise LaunchError(f"model directory {path} has no config.json; point --model at a Hugging Face model folder.")
    if key.count("/") == 1:
        for cache in _hf_cache_dirs():
            repo = cache / f"models--{key.replace('/', '--')}"
            ref = repo / "refs" / "main"
            snapshots = [repo / "snapshots" / ref.read_text().strip()] if ref.is_file() else []
            snapshots += sorted((repo / "snapshots").glob("*")) if (repo / "snapshots").is_dir() else []
            for snap in snapshots:
                if (snap / "config.json").is_file():
                    return snap / "config.json"
    return None


def _read_config_json(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LaunchError(f"{path} is not valid JSON ({err.__class__.__name__}); fix or re-download that config.json.") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise LaunchError(f"{path} has no model_type, so it is not a Hugging Face config.json; point --model at one that is.")
    return config


def spec_from_config(name: str, config: dict, source: str = "") -> ModelSpec:
    """The spec of a Hugging Face config dict (the ranks pass their built model's, so MFU uses the planner's
    FLOPs rule)."""
    model_type = config.get("model_type")
    if model_type in FAMILIES:
        return decoder_spec(name, config, source)
    if model_type in GPT2_LIKE:
        return gpt2_spec(name, config, source)
    return _meta_device_spec(name, config, source)


def count_params_on_meta(hf_config: dict) -> tuple[int, "object"]:
    """Exact count: build the model on the meta device; parameters() de-duplicates tied weights by identity."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.for_model(**hf_config)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
        model.tie_weights()  # under init_empty_weights tying is deferred; without it tied heads count twice
    except Exception as err:  # any failure here comes from the user's config values
        raise LaunchError(f"transformers cannot build this model config ({str(err).splitlines()[0]}); check its config.json.") from None
    return sum(p.numel() for p in model.parameters()), model


def _meta_device_spec(name: str, c: dict, source: str) -> ModelSpec:
    params, model = count_params_on_meta(c)
    config = model.config
    h = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or h // heads)
    linears, seen = [], set()
    first_block = _first_block(model)
    import torch

    for module_name, module in (first_block.named_modules() if first_block is not None else []):
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and id(weight) not in seen:
            seen.add(id(weight))
            linears.append((module_name.split(".")[-1], module.in_features, module.out_features))
    ffn = max((o for _, _, o in linears), default=4 * h)
    return ModelSpec(
        name=name, hf_config=c, num_params=params, layers=int(config.num_hidden_layers), hidden=h, heads=heads,
        kv_heads=kv, head_dim=head_dim, ffn=int(getattr(config, "intermediate_size", None) or ffn),
        vocab=int(config.vocab_size), tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        max_position=int(getattr(config, "max_position_embeddings", 0) or 0), source=source, layer_linears=linears,
    )


def _first_block(model):
    """The first repeated decoder block: the largest ModuleList's element 0."""
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    return max(lists, key=len)[0] if lists else None
