"""Model specs: the architecture facts the estimator and planner need, from an alias, catalog, HF cache or path.

Catalog entries are published config.json facts (JSON files in catalog/, each with its source). Their
parameter count is analytic so that `llaunch plan --model 70b` never imports torch; anything else is
instantiated on the meta device (accelerate's init_empty_weights) and counted exactly.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from launcher.errors import LaunchError

CATALOG_DIR = Path(__file__).with_name("catalog")
CONFIG_KEYS_FILE = Path(__file__).parents[1] / "data" / "config_keys.json"
# Families whose parameter count and layer shapes we compute analytically (tested equal to the meta count).
LLAMA_LIKE = ("llama", "mistral", "qwen2")
GPT2_LIKE = ("gpt2",)


@dataclass
class ModelSpec:
    """What a decoder-only LM is, in the numbers that decide memory and FLOPs."""

    name: str
    hf_config: dict
    num_params: int
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied_embeddings: bool
    max_position: int = 0
    source: str = ""
    published_params: int | None = None
    # Per-layer linear layers as (name, in_features, out_features); PEFT target names for LoRA.
    layer_linears: list[tuple[str, int, int]] = field(default_factory=list)

    @property
    def model_type(self) -> str:
        return self.hf_config["model_type"]

    @property
    def embedding_params(self) -> int:
        """Token embedding (+ learned positions for GPT-2): looked up, never multiplied."""
        positions = self.max_position * self.hidden if self.model_type in GPT2_LIKE else 0
        return self.vocab * self.hidden + positions

    @property
    def experts(self) -> int:
        """Routed experts per MoE layer (Mixtral's num_local_experts, DeepSeek's n_routed_experts); 0 if dense."""
        c = self.hf_config
        return int(c.get("num_local_experts") or c.get("n_routed_experts") or c.get("num_experts") or 0)

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    @property
    def linear_params(self) -> int:
        """Weights of every matmul in the blocks plus the LM head: what autocast copies and QLoRA quantizes."""
        blocks = self.layers * sum(i * o for _, i, o in self.layer_linears)
        return blocks + self.vocab * self.hidden

    @property
    def block_linear_params(self) -> int:
        return self.layers * sum(i * o for _, i, o in self.layer_linears)

    def lora_params(self, r: int, targets: list[str]) -> int:
        """Trainable adapter parameters: r * (in + out) for each targeted linear in each block."""
        names = self.lora_target_names(targets)
        return self.layers * sum(r * (i + o) for n, i, o in self.layer_linears if n in names)

    def lora_target_names(self, targets: list[str]) -> set[str]:
        known = {n for n, _, _ in self.layer_linears}
        if list(targets) == ["all-linear"]:
            return known
        unknown = [t for t in targets if t not in known]
        if unknown:
            raise LaunchError(
                f"LoRA target(s) {', '.join(unknown)} are not linear layers of {self.name}; "
                f"use all-linear or some of {', '.join(sorted(known))}."
            )
        return set(targets)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x matmul params + causal attention 6 * layers * seq * hidden (PaLM, app. B)."""
        return 6.0 * self.linear_params + 6.0 * self.layers * seq_len * self.heads * self.head_dim


def load_model_spec(name_or_path: str, overrides: dict | None = None) -> ModelSpec:
    """Resolve an alias, catalog name, local HF-cache id, model directory or config.json path. Offline."""
    overrides = dict(overrides or {})
    key = str(name_or_path).strip()
    entry = _catalog_entry(key)
    if entry is not None:
        config = _overridden(entry["name"], entry["hf_config"], overrides)
        spec = spec_from_config(entry["name"], config, source=entry["source"])
        if not overrides:
            spec.published_params = entry["published_params"]
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
    if model_type in LLAMA_LIKE:
        return _llama_like_spec(name, config, source)
    if model_type in GPT2_LIKE:
        return _gpt2_spec(name, config, source)
    return _meta_device_spec(name, config, source)


def _llama_like_spec(name: str, c: dict, source: str) -> ModelSpec:
    try:
        h, f, layers = int(c["hidden_size"]), int(c["intermediate_size"]), int(c["num_hidden_layers"])
        heads, vocab = int(c["num_attention_heads"]), int(c["vocab_size"])
    except (KeyError, TypeError, ValueError) as err:
        raise LaunchError(f"model config for {name} lacks a usable {err}; add it to config.json or --model-override.") from None
    kv = int(c.get("num_key_value_heads") or heads)
    if heads % kv:
        raise LaunchError(f"{name}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}; override both.")
    head_dim = int(c.get("head_dim") or h // heads)
    linears = [
        ("q_proj", h, heads * head_dim), ("k_proj", h, kv * head_dim), ("v_proj", h, kv * head_dim),
        ("o_proj", heads * head_dim, h), ("gate_proj", h, f), ("up_proj", h, f), ("down_proj", f, h),
    ]
    qkv_bias = c["model_type"] == "qwen2" or bool(c.get("attention_bias"))
    per_layer = sum(i * o for _, i, o in linears) + 2 * h
    per_layer += (heads + 2 * kv) * head_dim if qkv_bias else 0
    per_layer += h if c.get("attention_bias") else 0  # o_proj bias
    per_layer += (2 * f + h) if c.get("mlp_bias") else 0
    tied = bool(c.get("tie_word_embeddings", False))
    params = vocab * h + layers * per_layer + h + (0 if tied else vocab * h)
    return ModelSpec(
        name=name, hf_config=c, num_params=params, layers=layers, hidden=h, heads=heads, kv_heads=kv,
        head_dim=head_dim, ffn=f, vocab=vocab, tied_embeddings=tied,
        max_position=int(c.get("max_position_embeddings", 0)), source=source, layer_linears=linears,
    )


def _gpt2_spec(name: str, c: dict, source: str) -> ModelSpec:
    h, layers, heads, vocab = int(c["n_embd"]), int(c["n_layer"]), int(c["n_head"]), int(c["vocab_size"])
    f = int(c.get("n_inner") or 4 * h)
    positions = int(c["n_positions"])
    linears = [("c_attn", h, 3 * h), ("attn.c_proj", h, h), ("c_fc", h, f), ("mlp.c_proj", f, h)]
    per_layer = sum(i * o for _, i, o in linears) + 3 * h + h + f + h + 4 * h  # biases + two LayerNorms
    params = vocab * h + positions * h + layers * per_layer + 2 * h
    return ModelSpec(
        name=name, hf_config=c, num_params=params, layers=layers, hidden=h, heads=heads, kv_heads=heads,
        head_dim=h // heads, ffn=f, vocab=vocab, tied_embeddings=True, max_position=positions, source=source,
        layer_linears=linears,
    )


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
