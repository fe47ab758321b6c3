"""Build the model a config names: random init from an architecture, or a local pretrained directory."""

from __future__ import annotations

import torch

from launcher.config import ModelSection
from launcher.errors import LaunchError
from launcher.planning.models import pretrained_dir
from launcher.planning.plan import Plan
from launcher.train.recompute import enable_recompute

ATTENTION_IMPLEMENTATIONS = {"sdpa": "sdpa", "eager": "eager", "flash": "flash_attention_2"}


def architecture_config(model: ModelSection, vocab_size: int | None) -> dict:
    """The full HF config dict for a random-init model; vocab follows the tokenizer when we trained one."""
    from launcher.planning.models import load_model_spec

    overrides = dict(model.overrides)
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    return dict(load_model_spec(model.name_or_path, overrides).hf_config)


def build_model(model: ModelSection, plan: Plan, tokenizer, seed: int, quantization_config=None,
                empty: bool = False) -> torch.nn.Module:
    """fp32 master weights on CPU (engines move/shard them); same seed -> same init on every rank.

    With a quantization_config (QLoRA) the frozen base loads in 4-bit straight onto this rank's GPU (or CPU). With
    `empty` the parameters are built on the meta device, without reading or allocating any weight (buffers
    stay real): the FSDP engine fills this rank's shards from rank 0's copy, so a node holds one full copy
    of a large model in host memory instead of one per rank. Under ZeRO-3 (engines.model_construction)
    transformers builds and loads it inside deepspeed.zero.Init, so each rank only ever holds its partition."""
    from transformers import AutoModelForCausalLM

    attn = ATTENTION_IMPLEMENTATIONS[plan.attention]
    torch.manual_seed(seed)
    source = pretrained_dir(model.name_or_path)
    if source is not None and model.overrides:
        raise LaunchError("model.overrides changes an architecture; it cannot apply to pretrained weights.")
    if source is None and quantization_config is not None:
        raise LaunchError("QLoRA quantizes pretrained weights; set model.name_or_path to a local model directory.")
    if source is not None and not empty:
        load = {"dtype": torch.float32}
        if quantization_config is not None:
            device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
            load = {"dtype": torch.bfloat16, "quantization_config": quantization_config, "device_map": {"": device}}
        net = AutoModelForCausalLM.from_pretrained(source, attn_implementation=attn, **load)
    else:
        net = _from_config(model_architecture(model, tokenizer), attn, empty)
    if len(tokenizer) > net.get_input_embeddings().num_embeddings:
        net.resize_token_embeddings(len(tokenizer), mean_resizing=not empty)  # meta ranks: rank 0 has the values
    net.config.use_cache = False
    enable_recompute(net, plan.activation_checkpointing)
    if plan.precision == "bf16" and quantization_config is None:
        net.to(torch.bfloat16)
    return net


def _from_config(config, attn: str, empty: bool) -> torch.nn.Module:
    """A model of `config`, initialised by its own init (seeded by the caller), or on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights

    with init_empty_weights() if empty else no_init_weights():
        net = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    if empty:
        # transformers does not tie a model built under init_empty_weights: without this a meta rank holds
        # one more parameter than rank 0, and FSDP's collectives no longer match across ranks.
        net.tie_weights()
    if not (empty or is_deepspeed_zero3_enabled()):
        # Only the model's own init, as ZeRO-3 draws it (on rank 0, module by module, partitioned): the same
        # seed gives the same weights under every engine, and torch's default init is not run to be discarded.
        net.init_weights()
    return net


def compile_layers(net: torch.nn.Module) -> None:
    """torch.compile each decoder layer in place (nn.Module.compile): the layers are alike, so their graphs are
    reused; parameter names, state dicts and checkpoints stay as they were; DDP and FSDP wrap them as usual."""
    for layer in decoder_layers(net):
        layer.compile()


def model_architecture(model: ModelSection, tokenizer):
    """The Hugging Face config of the model a run builds: the local directory's, or the named architecture
    random-initialised with the tokenizer's vocabulary."""
    from transformers import AutoConfig

    source = pretrained_dir(model.name_or_path)
    if source is not None:
        return AutoConfig.from_pretrained(source)
    config = AutoConfig.for_model(**architecture_config(model, len(tokenizer)))
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return config


def parameter_elements(net: torch.nn.Module) -> tuple[int, int]:
    """(elements this process holds, elements in the model): a ZeRO-3 partitioned parameter is empty here and
    records its full size in ds_numel; a meta parameter holds nothing."""
    held = total = 0
    for p in net.parameters():
        total += getattr(p, "ds_numel", p.numel())
        held += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else 0 if p.is_meta else p.numel()
    return held, total


def tied_parameter_names(net: torch.nn.Module) -> set[str]:
    """Names under which a parameter appears a second time (a tied lm_head): a consolidated state dict of a
    sharded model holds them as separate copies, which a saved model must not repeat (transformers re-ties them)."""
    seen, aliases = set(), set()
    for name, param in net.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
        seen.add(id(param))
    return aliases


def decoder_layers(net: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks (the unit FSDP shards and checkpointing wraps), under PEFT's wrapper too."""
    base = net.get_base_model() if hasattr(net, "get_base_model") else net
    for attr in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj = base
        try:
            for part in attr.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return list(obj)
    raise LaunchError(f"cannot find the decoder layers of {type(net).__name__}; use a Llama/GPT-2-style model.")
