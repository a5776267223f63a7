"""transformers integration: `from_pretrained` quantizes experts on load, or reads a quantized folder.

Registered with transformers' quantizer registry under the method name `moetune_experts`, so that,
after `import finetune`:

- `AutoModelForCausalLM.from_pretrained(folder, quantization_config=ExpertsQuantizationConfig("nf4"))`
  quantizes the routed experts while loading a float checkpoint. Where the checkpoint stores one
  tensor per expert (Qwen3-MoE, Mixtral, DeepSeek-V3, OLMoE, ...), transformers' converter would read
  all of a layer's experts and stack them (about 3x the float stack of one projection at once) before
  a quantizer sees them; `PerExpertQuantizingConverter` instead reads, converts and quantizes one
  expert at a time into the preallocated codes. A checkpoint that already stores the fused stack
  (GPT-OSS, the built-in model) hands that stack to `QuantizeExperts`;
- `AutoModelForCausalLM.from_pretrained(quantized_folder)` reads a folder written by
  `save_pretrained` of such a model (`quantization_config` in config.json; the codes and scales are
  plain safetensors tensors named `<weight>_qweight` / `<weight>_qscale`).

Only routed fused experts are quantized; attention, embeddings, routers, shared experts and dense
MLPs stay in the load dtype (they are a few percent of an MoE's weights).
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import torch
from transformers.core_model_loading import (
    Concatenate,
    ConversionOps,
    MergeModulelist,
    WeightConverter,
)
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
        _install(module, name, codes, scales, full_layer_name, missing_keys)
        return {}


def _install(module, name: str, codes, scales, full_layer_name: str, missing_keys: set | None) -> None:
    set_quantized_weight_(module, name, codes, scales)
    prefix = full_layer_name.rpartition(".")[0]
    if missing_keys is not None:
        for key in (full_layer_name, f"{prefix}.{name}{CODES}", f"{prefix}.{name}{SCALES}"):
            missing_keys.discard(key)
    module._is_hf_initialized = True


def _expert_separable(converter: WeightConverter) -> bool:
    """A converter that reads one tensor per expert and stacks them (MergeModulelist along dim 0),
    then at most joins the stacks along a later dim (Concatenate): running it on one expert's tensors
    gives that expert's slice of the fused stack."""
    first, *rest = converter.operations
    return (
        isinstance(first, MergeModulelist)
        and first.dim == 0
        and all(isinstance(op, Concatenate) and op.dim >= 1 for op in rest)
    )


class PerExpertQuantizingConverter(WeightConverter):
    """A model's per-expert -> fused converter that quantizes expert by expert while loading.

    Reads expert e's checkpoint tensors (e.g. its gate and up projections), runs the model's own
    operations on them (giving the fused stack's slice e), quantizes that slice into the
    preallocated codes and drops it: never the float stack, never the list of all experts.
    Without quantization (or for a weight that is not quantized) it is the plain converter.
    """

    __slots__ = ()

    @classmethod
    def like(cls, converter: WeightConverter) -> PerExpertQuantizingConverter:
        """The same patterns, operations and scope as `converter` (what WeightConverter.copy keeps)."""
        new = cls(
            list(converter._original_source_patterns),
            list(converter._original_target_patterns),
            operations=list(converter.operations),
            force_cpu=converter.force_cpu,
        )
        new.scope_prefix, new.base_model_prefix = converter.scope_prefix, converter.base_model_prefix
        return new

    def convert(self, layer_name, model=None, config=None, hf_quantizer=None, loading_info=None):
        if hf_quantizer is None or self.quantization_operation is None:
            return super().convert(layer_name, model, config, hf_quantizer, loading_info)
        pending = {key: self.collected_tensors.pop(key) for key in list(self.collected_tensors)}
        module, name = get_module_from_name(model, layer_name)
        shape = module._pending_shapes[name]
        method = hf_quantizer.quantization_config.method
        codes = scales = None
        counts = {len(loaders) for loaders in pending.values()}
        if counts != {shape.num_experts}:
            raise ValueError(
                f"{layer_name}: the checkpoint has {sorted(counts)} experts, the model {shape.num_experts}"
            )
        for expert in range(shape.num_experts):
            inputs = {key: [_materialize(loaders[expert])] for key, loaders in pending.items()}
            for op in self.operations:
                inputs = op.convert(
                    inputs, source_patterns=self.source_patterns, target_patterns=self.target_patterns
                )
            (value,) = inputs.values()  # (1, out, in), or (1, in, out) for transposed layouts
            if codes is None:  # on the device the loader reads to (the parameter's, from device_map)
                codes = torch.empty(shape.qweight_shape(), dtype=shape.qweight_dtype(), device=value.device)
                scales = torch.empty(shape.scale_shape(), dtype=torch.float32, device=value.device)
            codes[expert : expert + 1], scales[expert : expert + 1] = quantize_weight(module, value, method)
            for key in pending:
                pending[key][expert] = None  # the checkpoint tensor's loader may hold its data
        missing = loading_info.missing_keys if loading_info else None
        _install(module, name, codes, scales, layer_name, missing)
        return {}


def _materialize(loader) -> torch.Tensor:
    return loader.result() if isinstance(loader, Future) else loader()


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

    def update_weight_conversions(self, weight_conversions, model):
        updated = super().update_weight_conversions(weight_conversions, model)
        if self.pre_quantized:
            return updated
        return [
            PerExpertQuantizingConverter.like(c) if type(c) is WeightConverter and _expert_separable(c) else c
            for c in updated
        ]

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
