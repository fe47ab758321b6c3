"""Fine-tuning methods on top of a built model: full, LoRA and prefix tuning through PEFT, QLoRA through
bitsandbytes 4-bit; saving an adapter alone and merging it back for export.

The method is applied before the engine wraps the model, so DDP/FSDP/DeepSpeed only ever see trainable
adapter parameters plus frozen base weights. Config keys are PEFT's own (LoraConfig, PrefixTuningConfig)
and transformers' BitsAndBytesConfig names.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch

from launcher.config import FinetuneSection
from launcher.errors import LaunchError
from launcher.planning.plan import LORA_METHODS

ADAPTER_CONFIG = "adapter_config.json"


def quantization_config(cfg: FinetuneSection):
    """The BitsAndBytesConfig QLoRA loads the base with (bitsandbytes >= 0.49 runs NF4 on CPU too); fails
    clearly without bitsandbytes.

    The packed 4-bit weights are stored as bf16 elements (bnb_4bit_quant_storage), the dtype of the rest of the
    base: FSDP2 then shards them like any other weight of a layer (each rank holds 1/world of the 4-bit base)
    and bitsandbytes restores each gathered weight's quantization state from its module in forward."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise LaunchError("finetune.method qlora needs bitsandbytes; pip install 'llaunch[qlora]'.") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=getattr(torch, cfg.bnb_4bit_compute_dtype), bnb_4bit_quant_storage=torch.bfloat16,
    )


def as_planned(cfg: FinetuneSection, plan) -> FinetuneSection:
    """The fine-tune a rank runs: the Plan's method, LoRA rank and targets (what the planner sized), the
    config's other PEFT keys. Prefix tuning stays the config's (plans written before it was recorded say full)."""
    if cfg.method == "prefix":
        return cfg
    return dataclasses.replace(cfg, method=plan.method, r=plan.lora_r, target_modules=list(plan.lora_targets))


def peft_config(cfg: FinetuneSection):
    from peft import LoraConfig, PrefixTuningConfig, TaskType

    if cfg.method in LORA_METHODS:
        targets = cfg.target_modules
        target = "all-linear" if targets == ["all-linear"] else targets
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM, r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=target, bias=cfg.bias, modules_to_save=cfg.modules_to_save or None,
            layers_to_transform=cfg.layers_to_transform or None,
        )
    if cfg.method == "prefix":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens)
    raise LaunchError(f"finetune.method {cfg.method!r} has no PEFT adapter.")


def apply_finetune_method(model: torch.nn.Module, cfg: FinetuneSection) -> torch.nn.Module:
    """Full: the model unchanged. LoRA/prefix: a PeftModel whose only trainable weights are the adapter's
    (plus modules_to_save). QLoRA expects a model loaded with `quantization_config(cfg)`."""
    if cfg.method == "full":
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if cfg.method == "qlora":
        if not getattr(model, "is_loaded_in_4bit", False):
            raise LaunchError("finetune.method qlora needs the base loaded in 4-bit; build it with "
                              "launcher.train.adapters.quantization_config.")
        # Recompute is the plan's, already applied by build_model (launcher/train/recompute.py): PEFT's own
        # switch would replace it with reentrant checkpointing of every layer whatever the plan says.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_4bit_storage_as_trained(model)
    try:
        with warnings.catch_warnings():  # PEFT reads the attribute transformers 5 deprecated: not the user's concern
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
            peft_model = get_peft_model(model, peft_config(cfg))
    except ValueError as err:
        # PEFT names the module it could not find; the user fixes target_modules / modules_to_save.
        raise LaunchError(f"finetune settings do not fit {type(model).__name__}: {err}") from None
    unregister_word_embeddings(peft_model)
    return peft_model


def unregister_word_embeddings(model: torch.nn.Module) -> None:
    """Prompt-learning PEFT models (prefix tuning) register the base's input embedding a second time, as
    `word_embeddings`. FSDP2's state-dict loading (torch.distributed.checkpoint) names each module once and then
    misses that second name; kept as a plain attribute, PEFT still reaches it and every state dict (checkpoints,
    the FSDP broadcast from rank 0) holds the weight once, under the base model's name."""
    embeddings = model._modules.pop("word_embeddings", None)
    if embeddings is not None:
        object.__setattr__(model, "word_embeddings", embeddings)


def keep_4bit_storage_as_trained(model: torch.nn.Module) -> None:
    """Turn off bitsandbytes' CPU inference repacking (on CPUs with AVX512-BF16, a no-grad forward such as an
    eval rewrites each Linear4bit weight in place into another layout): it would replace the bf16-stored
    shards FSDP owns and the layout checkpoints save, and it needs layers at least one quant block (64) wide."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def save_pretrained(model: torch.nn.Module, directory: str | Path, state_dict: dict | None = None) -> None:
    """`model.save_pretrained`, from the full state dict gathered across ranks when the engine shards parameters
    (for a PEFT model only the adapter: adapter_config.json + adapter_model.safetensors).

    PEFT saves a prompt-learning adapter (prefix tuning) by running its prompt encoder rather than reading the
    state dict, and a sharding engine (FSDP2) holds that encoder's weights in shards: it runs here on a copy
    loaded from `state_dict`, put in place for the save."""
    encoders = getattr(model, "prompt_encoder", None)
    if not encoders or state_dict is None:
        model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
        return
    sharded = encoders["default"]
    prefix = "prompt_encoder.default."
    whole = type(sharded)(model.peft_config["default"])
    whole.load_state_dict({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)})
    encoders["default"] = whole
    try:
        model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
    finally:
        encoders["default"] = sharded


def load_with_adapter(base: str | Path, adapter: str | Path, dtype=torch.float32) -> torch.nn.Module:
    """A local base model with a saved adapter on top, ready for generation (eval mode)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if not is_adapter_dir(adapter):
        raise LaunchError(f"{adapter} holds no {ADAPTER_CONFIG}; pass the directory a LoRA/prefix run saved.")
    if not Path(base).is_dir():
        raise LaunchError(f"base model {base} is not a local directory; llaunch downloads nothing at run time.")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    try:
        return PeftModel.from_pretrained(model, adapter).eval()
    except RuntimeError as err:
        if "size mismatch" not in str(err):
            raise
        raise LaunchError(f"adapter {adapter} was trained on another model than {base} (weight shapes differ); "
                          "pass the base it was trained on.") from None


def load_for_generation(model: str | Path, adapter: str | Path | None = None):
    """(model in eval mode, tokenizer) from a model directory, an adapter directory (its base is the one its
    adapter_config.json names), or a base plus an adapter; an adapter's own saved tokenizer wins."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model)
    if adapter is None and is_adapter_dir(model_dir):
        model_dir, adapter = Path(base_model_path(model_dir)), model_dir
    if not (model_dir / "config.json").exists():
        raise LaunchError(f"{model_dir} is not a model directory (no config.json); pass e.g. DIR/final of a run.")
    has_tokenizer = adapter and any(Path(adapter, f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(adapter if has_tokenizer else model_dir)
    if adapter:
        return load_with_adapter(model_dir, adapter), tokenizer
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").eval(), tokenizer


def base_model_path(adapter: str | Path) -> str:
    """The base the adapter was trained on, as recorded in its adapter_config.json."""
    import json

    return json.loads((Path(adapter) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or ""


def merge_adapter(adapter: str | Path, output: str | Path, base: str | Path | None = None) -> Path:
    """Fold a LoRA adapter into its base weights and write a plain Hugging Face model (+ tokenizer)."""
    from transformers import AutoTokenizer

    base = base or base_model_path(adapter)
    model = load_with_adapter(base, adapter)
    if not hasattr(model, "merge_and_unload") or model.peft_config["default"].peft_type.value != "LORA":
        raise LaunchError(f"{adapter} is a {model.peft_config['default'].peft_type.value} adapter; only LoRA "
                          "adapters merge into the weights (load prefix adapters with --adapter instead).")
    merged = model.merge_and_unload()
    output = Path(output)
    merged.save_pretrained(output, safe_serialization=True)
    for source in (adapter, base):
        if any((Path(source) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            AutoTokenizer.from_pretrained(source).save_pretrained(output)
            break
    return output

