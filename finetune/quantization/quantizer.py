"""transformers integration: `from_pretrained` quantizes experts on load, or reads a quantized folder.

Registered with transformers' quantizer registry under the method name `moetune_experts`, so that,
after `import finetune`:

- `AutoModelForCausalLM.from_pretrained(folder, quantization_config=ExpertsQuantizationConfig("nf4"))`
  quantizes the routed experts while loading a float checkpoint: transformers materialises one
  parameter at a time (after its own per-expert -> fused conversion) and hands each expert stack to
  `QuantizeExperts`, so the float stack of one layer is the largest transient;
- `AutoModelForCausalLM.from_pretrained(quantized_folder)` reads a folder written by
  `save_pretrained` of such a model (`quantization_config` in config.json; the codes and scales are
  plain safetensors tensors named `<weight>_qweight` / `<weight>_qscale`).

Only routed fused experts are quantized; attention, embeddings, routers, shared experts and dense
MLPs stay in the load dtype (they are a few percent of an MoE's weights).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.quantizers_utils import get_module_from_name
from transformers.utils.quantization_config import QuantizationConfigMixin

from finetune.quantization.experts import (
    CODES,
    SCALES,
    finish_pre_quantized_,
    fused_weight_names,
    is_quantized,
    make_quantized_,
    quantizable,
    quantize_weight,
    set_quantized_weight_,
)
from finetune.quantization.formats import NF4_BLOCK, check_method

QUANT_METHOD = "moetune_experts"


@register_quantization_config(QUANT_METHOD)
class ExpertsQuantizationConfig(QuantizationConfigMixin):
    """`method`: "int8" (per output row) or "nf4" (blocks of 64); see finetune.quantization.formats."""

    def __init__(self, method: str = "nf4", **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.method = check_method(method)
        self.block_size = NF4_BLOCK if method == "nf4" else None
        self.quantized = "routed experts"


class QuantizeExperts(ConversionOps):
    """Loader op: one float expert stack in, its codes and scales installed on the module."""

    def __init__(self, quantizer: ExpertsQuantizer) -> None:
        self.quantizer = quantizer

    def convert(self, input_dict, model=None, full_layer_name=None, missing_keys=None, **kwargs):
        (value,) = input_dict.values()
        value = value[0] if isinstance(value, list) else value
        module, name = get_module_from_name(model, full_layer_name)
        codes, scales = quantize_weight(module, value, self.quantizer.quantization_config.method)
        set_quantized_weight_(module, name, codes, scales)
        prefix = full_layer_name.rpartition(".")[0]
        if missing_keys is not None:
            for key in (full_layer_name, f"{prefix}.{name}{CODES}", f"{prefix}.{name}{SCALES}"):
                missing_keys.discard(key)
        module._is_hf_initialized = True
        return {}


@register_quantizer(QUANT_METHOD)
class ExpertsQuantizer(HfQuantizer):
    """Quantize-on-load and quantized-checkpoint loading for fused routed experts."""

    requires_calibration = False
    quantization_config: ExpertsQuantizationConfig

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        check_method(self.quantization_config.method)

    def _process_model_before_weight_loading(self, model, **kwargs: Any) -> None:
        method = self.quantization_config.method
        for module in model.modules():
            if is_quantized(module) or not quantizable(module):
                continue
            names = fused_weight_names(module)
            make_quantized_(module, method, getattr(module, names[0]).dtype, names)
            if self.pre_quantized:
                finish_pre_quantized_(module)
                module._is_hf_initialized = True  # loaded codes and scales must not meet _init_weights

    def param_needs_quantization(self, model, param_name: str, **kwargs: Any) -> bool:
        module, name = get_module_from_name(model, param_name)
        return is_quantized(module) and name in getattr(module, "_pending_shapes", {})

    def get_quantize_ops(self) -> QuantizeExperts:
        return QuantizeExperts(self)

    def _process_model_after_weight_loading(self, model, **kwargs: Any) -> None:
        left = [
            f"{name}.{weight}"
            for name, module in model.named_modules()
            if is_quantized(module)
            for weight in getattr(module, "_pending_shapes", {})
        ]
        if left:
            raise ValueError(f"no weights were loaded for quantized expert stacks (first: {left[0]})")
        return model

    @property
    def quantized_element_size(self) -> float:
        return 1.0 if self.quantization_config.method == "int8" else 0.5

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # LoRA on top; the codes themselves are frozen


def quantization_config_of(model: torch.nn.Module) -> ExpertsQuantizationConfig | None:
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(config, ExpertsQuantizationConfig):
        return config
    if isinstance(config, dict) and config.get("quant_method") == QUANT_METHOD:
        return ExpertsQuantizationConfig(config["method"])
    return None
