"""Quantized experts: the routed experts' frozen weights stored as int8 or NF4 (QLoRA for MoE).

- `formats`: the two storage formats (quantize / dequantize one expert), bitsandbytes-compatible NF4.
- `experts`: the quantized twin of a transformers fused-experts module (dequantizes hit experts only).
- `quantize_model_experts_`: quantize every routed experts module of a loaded model in place.
"""

from __future__ import annotations

from torch import nn

from finetune.quantization.experts import is_quantized, quantizable, quantize_experts_
from finetune.quantization.formats import METHODS, check_method

__all__ = ["METHODS", "is_quantized", "quantize_model_experts_"]


def quantize_model_experts_(model: nn.Module, method: str) -> list[str]:
    """Quantize the routed experts of a loaded float model in place; returns the module names.

    The model is marked as transformers marks a model quantized on load (`config.quantization_config`,
    `hf_quantizer`), so `save_pretrained` writes a quantized folder that `from_pretrained` reads.
    """
    from finetune.quantization.quantizer import ExpertsQuantizationConfig, ExpertsQuantizer

    check_method(method)
    done = []
    for name, module in model.named_modules():
        if is_quantized(module) or not quantizable(module):
            continue
        quantize_experts_(module, method)
        done.append(name)
    config = ExpertsQuantizationConfig(method)
    model.config.quantization_config = config
    model.hf_quantizer = ExpertsQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = config.quant_method
    return done
