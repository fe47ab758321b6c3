"""FP8 training: torchao's float8 linears (`convert_to_float8_training`), as torchtitan's Float8Converter does
(torchtitan/components/quantization/float8.py).

Every decoder linear becomes a Float8Linear before the engine wraps the model: its weight stays an fp32 master
under the same name (checkpoints, export and FSDP2's sharding see an ordinary weight), and each matmul casts its
operands to float8 with dynamic tensorwise scales and runs torch._scaled_mm, which has a CPU kernel as well as
the fp8 tensor cores' one (torch 2.13). Around the linears the plan's fp8 runs as amp-bf16 (AUTOCAST_DTYPES).
The LM head stays out, as torchtitan leaves its output layer: the loss reads its weight directly
(launcher.train.chunked_loss) and the vocabulary rarely divides by 16. pad_inner_dim pads a token count that
does not divide by 16 (torch._scaled_mm's rule) instead of failing.
"""

from __future__ import annotations

from torch import nn

FP8_DIVISOR = 16  # torch._scaled_mm: both dimensions of a weight must divide by it


def is_fp8_linear_candidate(module: nn.Module, name: str) -> bool:
    """A linear torchao converts: not the LM head, and a weight whose dimensions torch._scaled_mm takes."""
    return (isinstance(module, nn.Linear) and name.rpartition(".")[2] != "lm_head"
            and module.in_features % FP8_DIVISOR == 0 and module.out_features % FP8_DIVISOR == 0)


def convert_to_float8(model: nn.Module) -> None:
    """Swap the model's eligible linears for torchao Float8Linear in place (meta weights too)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    convert_to_float8_training(model, config=Float8LinearConfig(pad_inner_dim=True),
                               module_filter_fn=is_fp8_linear_candidate)
