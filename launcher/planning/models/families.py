"""Analytic specs: a config.json's facts turned into a ModelSpec without torch, one rule per module of the
transformers 5 model class of its model_type (tests/unit/test_models.py builds each on the meta device and
compares the count exactly).

Every family here is a pre-norm decoder: token embedding, layers of (attention, MLP or mixture of experts),
a final norm and an LM head (tied or not). What differs is declared in FAMILIES; the experts are read by
_moe_spec, multi-head latent attention by _mla_spec.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from launcher.errors import LaunchError
from launcher.planning.models.spec import MLASpec, ModelSpec, MoESpec

MLP_NAMES = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    """What one model_type's decoder layer holds beyond the Llama block (q/k/v/o + gate/up/down + 2 RMSNorms)."""

    qkv_bias: bool = False  # Qwen2: biases on q, k, v only
    qk_norm: bool = False  # Qwen3, Gemma 3: an RMSNorm over head_dim on queries and keys
    norms_per_layer: int = 2  # Gemma 3 adds pre/post-feedforward norms
    sinks: bool = False  # gpt-oss: one learned attention-sink logit per head
    tied_by_default: bool = False  # the config class's tie_word_embeddings default
    layer_types: bool = False  # the config class derives sliding/full attention per layer


FAMILIES = {
    "llama": Family(), "mistral": Family(), "qwen2": Family(qkv_bias=True),
    "qwen3": Family(qk_norm=True, layer_types=True),
    "gemma3_text": Family(qk_norm=True, norms_per_layer=4, tied_by_default=True, layer_types=True),
    "mixtral": Family(), "qwen3_moe": Family(qk_norm=True), "deepseek_v3": Family(),
    "gpt_oss": Family(sinks=True, layer_types=True),
}


def decoder_spec(name: str, c: dict, source: str) -> ModelSpec:
    """The spec of a config of a model_type in FAMILIES."""
    fam = FAMILIES[c["model_type"]]
    try:
        h, f, layers = int(c["hidden_size"]), int(c["intermediate_size"]), int(c["num_hidden_layers"])
        heads, vocab = int(c["num_attention_heads"]), int(c["vocab_size"])
        moe, mla = _moe_spec(c, layers), _mla_spec(c)
    except (KeyError, TypeError, ValueError) as err:
        raise LaunchError(f"model config for {name} lacks a usable {err}; add it to config.json or --model-override.") from None
    kv = int(c.get("num_key_value_heads") or heads)
    if heads % kv:
        raise LaunchError(f"{name}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}; override both.")
    head_dim = mla.qk_head_dim if mla else int(c.get("head_dim") or h // heads)
    attention, attention_extra = _attention(c, fam, h, heads, kv, head_dim, mla)
    mlp = _mlp(h, f, bool(c.get("mlp_bias")))
    norms = fam.norms_per_layer * h + attention_extra
    if moe is None:
        linears, layer_params = attention + mlp[0], norms + mlp[1]
        per_token_ffn = f
    else:
        shared = _mlp(h, moe.expert_ffn * moe.shared_experts, False) if moe.shared_experts else ([], 0)
        linears, layer_params = attention + shared[0], norms + shared[1] + moe.router_params(h) + moe.experts * moe.expert_params(h)
        moe = replace(moe, dense_layer_linears=tuple(attention + mlp[0]),
                      dense_layer_params=norms + mlp[1] + _weights(attention + mlp[0]))
        per_token_ffn = moe.expert_ffn * (moe.experts_per_token + moe.shared_experts)
    layer_params += _weights(linears)
    tied = bool(c.get("tie_word_embeddings", fam.tied_by_default))
    dense = layers - len(moe.layers) if moe else 0
    blocks = (layers - dense) * layer_params + (dense * moe.dense_layer_params if moe else 0)
    params = vocab * h + blocks + h + (0 if tied else vocab * h)
    window, sliding = _sliding(c, fam, layers)
    return ModelSpec(
        name=name, hf_config=c, num_params=params, layers=layers, hidden=h, heads=heads, kv_heads=kv,
        head_dim=head_dim, ffn=per_token_ffn, vocab=vocab, tied_embeddings=tied,
        max_position=int(c.get("max_position_embeddings", 0)), source=source, layer_linears=linears,
        moe=moe, mla=mla, sliding_window=window, sliding_layers=sliding, qk_norm=fam.qk_norm,
    )


def _weights(linears: list[tuple[str, int, int]]) -> int:
    return sum(i * o for _, i, o in linears)


def _mlp(h: int, f: int, bias: bool) -> tuple[list[tuple[str, int, int]], int]:
    """A SwiGLU / GeGLU MLP's linears and its bias elements."""
    return [("gate_proj", h, f), ("up_proj", h, f), ("down_proj", f, h)], (2 * f + h) if bias else 0


def _attention(c: dict, fam: Family, h: int, heads: int, kv: int, d: int, mla: MLASpec | None):
    """(linears, other attention parameters: biases, q/k norms, sinks, MLA's latent norms)."""
    bias = bool(c.get("attention_bias"))
    if mla is not None:
        qk, latent = heads * mla.qk_head_dim, mla.kv_lora_rank + mla.qk_rope_head_dim
        q = ([("q_a_proj", h, mla.q_lora_rank), ("q_b_proj", mla.q_lora_rank, qk)] if mla.q_lora_rank
             else [("q_proj", h, qk)])
        linears = [*q, ("kv_a_proj_with_mqa", h, latent),
                   ("kv_b_proj", mla.kv_lora_rank, heads * (mla.qk_nope_head_dim + mla.v_head_dim)),
                   ("o_proj", heads * mla.v_head_dim, h)]
        extra = mla.q_lora_rank + mla.kv_lora_rank  # q_a_layernorm, kv_a_layernorm
        extra += ((mla.q_lora_rank if mla.q_lora_rank else 0) + latent + h) if bias else 0
        return linears, extra
    linears = [("q_proj", h, heads * d), ("k_proj", h, kv * d), ("v_proj", h, kv * d), ("o_proj", heads * d, h)]
    extra = (heads + 2 * kv) * d if bias or fam.qkv_bias else 0
    extra += h if bias else 0  # o_proj's bias
    extra += 2 * d if fam.qk_norm else 0
    extra += heads if fam.sinks else 0
    return linears, extra


def _first(c: dict, *keys: str):
    """The value under the first key present: config.json spells a count as the model's own name for it
    (num_experts, n_routed_experts), a config class's to_dict() (the ranks' spec) as its attribute_map target."""
    for key in keys:
        if key in c:
            return c[key]
    raise KeyError(keys[0])


def _moe_spec(c: dict, layers: int) -> MoESpec | None:
    """The experts of a mixtral / qwen3_moe / deepseek_v3 / gpt_oss config, each read as its config class does."""
    kind = c["model_type"]
    if kind in ("mixtral", "gpt_oss"):
        return MoESpec(experts=int(_first(c, "num_local_experts", "num_experts")), experts_per_token=int(c["num_experts_per_tok"]),
                       expert_ffn=int(c["intermediate_size"]), layers=tuple(range(layers)),
                       router="softmax", biases=kind == "gpt_oss",
                       lora_names=("gate", "w1", "w3", "w2") if kind == "mixtral" else ())
    if kind == "qwen3_moe":
        experts, step = int(_first(c, "num_experts", "num_local_experts")), int(c.get("decoder_sparse_step", 1))
        dense = set(c.get("mlp_only_layers") or [])
        moe_layers = tuple(i for i in range(layers) if i not in dense and experts > 0 and (i + 1) % step == 0)
        return MoESpec(experts=experts, experts_per_token=int(c["num_experts_per_tok"]),
                       expert_ffn=int(c["moe_intermediate_size"]), layers=moe_layers, router="softmax",
                       lora_names=("gate", *MLP_NAMES))
    if kind == "deepseek_v3":
        first_moe = int(c.get("first_k_dense_replace", 0))
        return MoESpec(experts=int(_first(c, "n_routed_experts", "num_local_experts")), experts_per_token=int(c["num_experts_per_tok"]),
                       expert_ffn=int(c["moe_intermediate_size"]), layers=tuple(range(first_moe, layers)),
                       shared_experts=int(c.get("n_shared_experts") or 0), router="sigmoid",
                       lora_names=("gate", *MLP_NAMES))
    return None


def _mla_spec(c: dict) -> MLASpec | None:
    if c["model_type"] != "deepseek_v3":
        return None
    return MLASpec(q_lora_rank=int(c.get("q_lora_rank") or 0), kv_lora_rank=int(c["kv_lora_rank"]),
                   qk_nope_head_dim=int(c["qk_nope_head_dim"]), qk_rope_head_dim=int(c["qk_rope_head_dim"]),
                   v_head_dim=int(c["v_head_dim"]))


def _sliding(c: dict, fam: Family, layers: int) -> tuple[int, int]:
    """(window, sliding layers) as the config class lays them out: its layer_types, else its own default
    (Gemma 3: every sliding_window_pattern-th layer global; gpt-oss: alternating; Qwen3: from max_window_layers)."""
    window = int(c.get("sliding_window") or 0)
    if not fam.layer_types or not window:
        return 0, 0
    kind, types = c["model_type"], c.get("layer_types")
    if types is None and kind == "gemma3_text":
        pattern = int(c.get("sliding_window_pattern", 6))
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    elif types is None and kind == "gpt_oss":
        types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
    elif types is None:
        on, start = bool(c.get("use_sliding_window")), int(c.get("max_window_layers", layers))
        types = ["sliding_attention" if on and i >= start else "full_attention" for i in range(layers)]
    sliding = sum(1 for t in types if t == "sliding_attention")
    return (window, sliding) if sliding else (0, 0)


def gpt2_spec(name: str, c: dict, source: str) -> ModelSpec:
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
