"""The model spec: what a decoder-only LM is, in the numbers that decide memory and FLOPs, with its mixture of
experts and latent attention where it has them (each record checks its own values once, when it is made)."""

from __future__ import annotations

from dataclasses import dataclass, field

from launcher.errors import LaunchError

GPT2_LIKE = ("gpt2",)
ROUTERS = ("softmax", "sigmoid")  # Mixtral, Qwen3-MoE, gpt-oss: softmax over top-k; DeepSeek-V3: sigmoid scores
Linear = tuple[str, int, int]  # (PEFT target name, in_features, out_features)


@dataclass(frozen=True)
class MoESpec:
    """Routed experts (SwiGLU MLPs of width expert_ffn, stored as 3-D parameters in transformers 5, so PEFT's
    all-linear does not adapt them), the shared experts every token also runs, the router, and which layers are
    MoE: the others (DeepSeek-V3's first_k_dense_replace, Qwen3-MoE's mlp_only_layers) keep a dense MLP."""

    experts: int
    experts_per_token: int
    expert_ffn: int
    layers: tuple[int, ...]
    shared_experts: int = 0
    router: str = "softmax"
    biases: bool = False  # gpt-oss: a router bias and biases on every expert's projections
    # Names PEFT (>= 0.18, peft/utils/transformers_weight_conversion.py) maps onto the router and the fused
    # expert parameters for this model type, as (router, gate, up, down); all-linear includes them. Empty: none
    # (gpt-oss), so all-linear adapts the nn.Linear modules only.
    lora_names: tuple[str, ...] = ()
    dense_layer_linears: tuple[Linear, ...] = ()  # a dense layer's linears (attention + MLP)
    dense_layer_params: int = 0

    def __post_init__(self):
        if self.experts < 1 or self.expert_ffn < 1 or self.shared_experts < 0:
            raise LaunchError(f"a mixture of experts needs at least 1 expert of width >= 1 and no negative shared "
                              f"experts (got {self.experts} x {self.expert_ffn}, {self.shared_experts} shared); "
                              "fix the config or --model-override.")
        if not 1 <= self.experts_per_token <= self.experts:
            raise LaunchError(f"num_experts_per_tok {self.experts_per_token} must be between 1 and the "
                              f"{self.experts} routed experts; fix the config or --model-override.")
        if self.router not in ROUTERS:
            raise LaunchError(f"router scoring {self.router!r} is not one of {', '.join(ROUTERS)}.")

    def expert_params(self, hidden: int) -> int:
        """One routed expert: gate, up (fused as gate_up_proj) and down, plus gpt-oss's biases."""
        return 3 * hidden * self.expert_ffn + ((2 * self.expert_ffn + hidden) if self.biases else 0)

    def router_params(self, hidden: int) -> int:
        return self.experts * hidden + (self.experts if self.biases else 0)

    def lora_params(self, r: int, names: set[str], hidden: int) -> int:
        """One MoE layer's adapters on the router (r x hidden, experts x r) and the experts: PEFT's ParamWrapper
        gives a 3-D parameter of E experts rank rho lora_A (rho * E, in) and lora_B (out, rho * E); the fused
        gate_up_proj gets rank 2r (its two targets), down_proj rank r."""
        if not self.lora_names:
            return 0
        router, gate, up, down = self.lora_names
        e, f = self.experts, self.expert_ffn
        total = r * (hidden + e) if router in names else 0
        total += 2 * r * e * (hidden + 2 * f) if {gate, up} & names else 0
        return total + (r * e * (f + hidden) if down in names else 0)

    def lora_inputs(self, hidden: int) -> dict[str, int]:
        """Elements per token each router / expert adapter's lora_A reads: every routed copy of the token."""
        if not self.lora_names:
            return {}
        router, gate, up, down = self.lora_names
        k = self.experts_per_token
        return {router: hidden, gate: k * hidden, up: k * hidden, down: k * self.expert_ffn}


@dataclass(frozen=True)
class MLASpec:
    """DeepSeek's multi-head latent attention: queries through a q_lora_rank bottleneck (0: a plain q_proj), keys
    and values from one kv_lora_rank latent plus a shared RoPE key of qk_rope_head_dim."""

    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    def __post_init__(self):
        sizes = (self.kv_lora_rank, self.qk_nope_head_dim + self.qk_rope_head_dim, self.v_head_dim)
        if min(sizes) < 1 or min(self.q_lora_rank, self.qk_nope_head_dim, self.qk_rope_head_dim) < 0:
            raise LaunchError(f"latent attention sizes must be positive (kv_lora_rank {self.kv_lora_rank}, "
                              f"qk head {self.qk_nope_head_dim}+{self.qk_rope_head_dim}, v_head_dim "
                              f"{self.v_head_dim}, q_lora_rank {self.q_lora_rank}); fix the config or --model-override.")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass
class ModelSpec:
    """What a decoder-only LM is, in the numbers that decide memory and FLOPs. For a mixture of experts ffn is
    the MLP width one token passes through (top-k + shared experts), layer_linears an MoE layer's nn.Linear
    modules (attention, shared experts), and num_params counts every stored expert."""

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
    layer_linears: list[Linear] = field(default_factory=list)
    moe: MoESpec | None = None
    mla: MLASpec | None = None
    sliding_window: int = 0  # keys a sliding-window layer attends to; 0: every layer attends to all
    sliding_layers: int = 0
    qk_norm: bool = False  # Qwen3, Gemma 3: an RMSNorm over each head's queries and keys (families.Family)

    @property
    def model_type(self) -> str:
        return self.hf_config["model_type"]

    def layer_groups(self) -> list[tuple[int, list[Linear]]]:
        """(how many layers, the nn.Linear modules of each): MoE and dense layers where a model mixes them."""
        if self.moe is None:
            return [(self.layers, self.layer_linears)]
        dense = self.layers - len(self.moe.layers)
        return [(len(self.moe.layers), self.layer_linears)] + ([(dense, list(self.moe.dense_layer_linears))] if dense else [])

    @property
    def embedding_params(self) -> int:
        """Token embedding (+ learned positions for GPT-2): looked up, never multiplied."""
        positions = self.max_position * self.hidden if self.model_type in GPT2_LIKE else 0
        return self.vocab * self.hidden + positions

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    @property
    def routed_ffn(self) -> int:
        """The routed experts' share of `ffn`: the top-k experts' width a token passes through."""
        return self.moe.experts_per_token * self.moe.expert_ffn if self.moe else 0

    @property
    def expert_matrix_params(self) -> int:
        """Every routed expert's projection weights (biases aside): stored, quantized, copied, all of them."""
        return len(self.moe.layers) * self.moe.experts * 3 * self.hidden * self.moe.expert_ffn if self.moe else 0

    @property
    def active_params(self) -> int:
        """Parameters one token uses: all but the routed experts it is not sent to (the published convention:
        embeddings and LM head included)."""
        if self.moe is None:
            return self.num_params
        idle = self.moe.experts - self.moe.experts_per_token
        return self.num_params - len(self.moe.layers) * idle * self.moe.expert_params(self.hidden)

    @property
    def block_linear_params(self) -> int:
        """Weights of every matmul in the blocks (routed experts included, routers not)."""
        return sum(n * sum(i * o for _, i, o in linears) for n, linears in self.layer_groups()) + self.expert_matrix_params

    @property
    def quantized_params(self) -> int:
        """What QLoRA's bitsandbytes replaces: nn.Linear weights of the blocks. transformers 5 quantizes nn.Linear
        modules only (integrations/bitsandbytes.py), so routed experts, 3-D parameters, stay in bf16."""
        return self.block_linear_params - self.expert_matrix_params

    @property
    def linear_params(self) -> int:
        """Weights of every matmul in the blocks plus the LM head: what autocast copies to bf16."""
        return self.block_linear_params + self.vocab * self.hidden

    @property
    def active_linear_params(self) -> int:
        """Matmul weights one token multiplies through: its top-k experts of each MoE layer and the router."""
        if self.moe is None:
            return self.linear_params
        per_layer = self.moe.experts_per_token * 3 * self.hidden * self.moe.expert_ffn + self.moe.experts * self.hidden
        return self.linear_params - self.expert_matrix_params + len(self.moe.layers) * per_layer

    def lora_params(self, r: int, targets: list[str]) -> int:
        """Trainable adapter parameters: r * (in + out) for each targeted linear in each block, plus what PEFT
        puts on the router and experts of each MoE layer (MoESpec.lora_params). PEFT maps the names in
        MoESpec.lora_names onto the experts only: DeepSeek-V3's shared experts and dense MLPs (also gate_proj,
        up_proj, down_proj) get no adapter, under all-linear too."""
        names = self.lora_target_names(targets)
        on_linears = names - set(self.moe.lora_names) if self.moe else names
        linears = sum(n * sum(r * (i + o) for name, i, o in group if name in on_linears) for n, group in self.layer_groups())
        return linears + (len(self.moe.layers) * self.moe.lora_params(r, names, self.hidden) if self.moe else 0)

    def lora_inputs(self) -> dict[str, int]:
        """Elements per token that each adaptable module's input holds (what its lora_A saves for backward)."""
        inputs = {name: i for _, group in self.layer_groups() for name, i, _ in group}
        return {**inputs, **(self.moe.lora_inputs(self.hidden) if self.moe else {})}

    def lora_target_names(self, targets: list[str]) -> set[str]:
        known = set(self.lora_inputs())
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
        """Training FLOPs per token (PaLM, app. B): 6 x the matmul weights a token multiplies through (its
        active experts only) + causal attention, 6 * seq * heads * head_dim per layer with QK^T over the query /
        key width and AV over the value width (MLA's differ) and seq capped at the window on sliding layers."""
        qk, v = (self.mla.qk_head_dim, self.mla.v_head_dim) if self.mla else (self.head_dim, self.head_dim)
        full = self.layers - self.sliding_layers
        attended = full * seq_len + self.sliding_layers * min(seq_len, self.sliding_window)
        return 6.0 * self.active_linear_params + 3.0 * self.heads * (qk + v) * attended
