"""Fused experts whose frozen weights are stored quantized, dequantized one hit expert at a time.

`quantize_experts_(module, method)` turns a transformers fused-experts module (the built-in model's,
Qwen3-MoE's, Mixtral's, DeepSeek-V3's, GPT-OSS's, ...) into its quantized twin in place: the class
becomes `Quantized<Class>` (a subclass, so flags such as `has_gate`, `is_transposed`, the gate and the
activation stay as they were), and each 3D weight `gate_up_proj` / `up_proj` / `down_proj` is replaced
by two buffers, `<name>_qweight` (codes) and `<name>_qscale` (fp32 scales), in the formats of
`finetune.quantization.formats`. No tensor subclass: the state dict holds plain uint8 / int8 / fp32
tensors, `.to()` moves them, and DDP broadcasts them like any buffer.

The routed computation (`adapters.experts.routed_experts_forward`) asks the module for
`dequantize_expert(name, e)` (expert e's (out, in) weight in the compute dtype) for each expert that
received tokens, forward and backward, and never sees how it is stored. The module's own forward (no
LoRA, or adapters disabled) is that same computation without LoRA.

PEFT finds expert weights by their parameter names. Attribute access to a quantized name returns a
NaN placeholder of the float weight's shape and dtype (a zero-stride view, no memory) so that PEFT's
`ParamWrapper` can size its LoRA factors, and `exposed_parameters()` registers those placeholders as
parameters while PEFT searches for targets (adapters.inject does this). The values are NaN so that a
code path that wrongly reads them fails loudly instead of computing with zeros.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from finetune.quantization.formats import (
    QuantizedShape,
    check_method,
    dequantize_expert,
    dequantize_experts,
    quantize,
)

WEIGHT_NAMES = ("gate_up_proj", "up_proj", "down_proj")
CODES, SCALES = "_qweight", "_qscale"
QUANTIZE_CHUNK_BYTES = 8 * 2**20  # fp32 working set while quantizing a stack (transients ~4x)


class QuantizedExpertsMixin:
    """The quantized behaviour, mixed in front of a transformers experts class (see module docstring)."""

    quant_method: str
    compute_dtype: torch.dtype
    quantized_shapes: dict[str, QuantizedShape]

    def __getattr__(self, name: str):
        shapes = self.__dict__.get("quantized_shapes")
        if shapes is not None and name in shapes:
            return self._placeholder(name)
        return super().__getattr__(name)

    def _placeholder(self, name: str) -> torch.Tensor:
        codes = self._buffers[name + CODES]
        nan = torch.full((), float("nan"), dtype=self.compute_dtype, device=codes.device)
        return nan.expand(*self.float_shape(name))

    def float_shape(self, name: str) -> tuple[int, int, int]:
        """The shape the float parameter had: (E, out, in), or (E, in, out) for transposed layouts."""
        shape = self.quantized_shapes[name]
        if getattr(self, "is_transposed", False):
            return (shape.num_experts, shape.in_features, shape.out_features)
        return (shape.num_experts, shape.out_features, shape.in_features)

    def dequantize_expert(self, name: str, expert: int) -> torch.Tensor:
        """Expert `expert`'s weight of projection `name` as (out, in) in the compute dtype (a new tensor)."""
        return dequantize_expert(
            self._buffers[name + CODES],
            self._buffers[name + SCALES],
            self.quantized_shapes[name],
            expert,
            self.compute_dtype,
        )

    def dequantize_experts(self, name: str, first: int, end: int) -> torch.Tensor:
        """Experts first:end of projection `name` as (n, out, in) in the compute dtype (one new tensor)."""
        return dequantize_experts(
            self._buffers[name + CODES],
            self._buffers[name + SCALES],
            self.quantized_shapes[name],
            first,
            end,
            self.compute_dtype,
        )

    def quantized_nbytes(self) -> int:
        return sum(shape.nbytes() for shape in self.quantized_shapes.values())

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        from adapters.experts import routed_experts_forward

        return routed_experts_forward(self, hidden_states, top_k_index, top_k_weights, lora={})

    @contextmanager
    def exposed_parameters(self) -> Iterator[None]:
        """Register the placeholders as (frozen) parameters, for PEFT's search by parameter name."""
        # straight into _parameters: register_parameter refuses names that __getattr__ already answers
        for name in self.quantized_shapes:
            self._parameters[name] = nn.Parameter(self._placeholder(name), requires_grad=False)
        try:
            yield
        finally:
            for name in self.quantized_shapes:
                self._parameters.pop(name, None)

    def _apply(self, fn, recurse=True):
        """`.to()` / `.half()` move codes and scales but keep scales in fp32; the compute dtype follows."""
        scales = {key: self._buffers.pop(key) for key in list(self._buffers) if key.endswith(SCALES)}
        device = next(iter(scales.values())).device if scales else torch.device("cpu")
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=device))
        super()._apply(fn, recurse)
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        for key, scale in scales.items():
            self._buffers[key] = scale.to(probe.device)
        return self

    def extra_repr(self) -> str:
        names = ", ".join(f"{n} {list(self.float_shape(n))}" for n in self.quantized_shapes)
        return f"{self.quant_method}: {names}; compute dtype {self.compute_dtype}"


_CLASSES: dict[type, type] = {}


def quantized_class(cls: type) -> type:
    """`Quantized<cls>`: the mixin in front of `cls` (one class per experts class, reused)."""
    if issubclass(cls, QuantizedExpertsMixin):
        return cls
    if cls not in _CLASSES:
        new = type(f"Quantized{cls.__name__}", (QuantizedExpertsMixin, cls), {"__module__": __name__})
        globals()[new.__name__] = new  # picklable by name
        _CLASSES[cls] = new
    return _CLASSES[cls]


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, QuantizedExpertsMixin)


def fused_weight_names(module: nn.Module) -> list[str]:
    """Names of the 3D fused expert weights of a (not yet quantized) experts module."""
    return [n for n, p in module.named_parameters(recurse=False) if n in WEIGHT_NAMES and p.ndim == 3]


def quantizable(module: nn.Module) -> bool:
    """A fused-experts module whose computation the routed path reproduces (so it can run quantized)."""
    from adapters.expert_fast_path import fast_path_supports

    return bool(fused_weight_names(module)) and fast_path_supports(module)


def quantized_shape(module: nn.Module, name: str, method: str, shape: tuple[int, ...]) -> QuantizedShape:
    num_experts, first, second = shape
    out_features, in_features = (
        (second, first) if getattr(module, "is_transposed", False) else (first, second)
    )
    return QuantizedShape(method, num_experts, out_features, in_features)


def make_quantized_(module: nn.Module, method: str, compute_dtype: torch.dtype, names: list[str]) -> None:
    """Switch `module` to its quantized class with empty (meta) code / scale buffers for `names`.

    The float parameters `names` stay registered until `set_quantized_weight_` replaces them, so that
    a loader can still fill them (on-the-fly quantization) or find them gone (pre-quantized).
    """
    check_method(method)
    shapes = {n: quantized_shape(module, n, method, tuple(getattr(module, n).shape)) for n in names}
    module.__class__ = quantized_class(type(module))
    module.quant_method = method
    module.compute_dtype = compute_dtype
    module.quantized_shapes = {}
    for name, shape in shapes.items():
        module._buffers[name + CODES] = torch.empty(
            shape.qweight_shape(), dtype=shape.qweight_dtype(), device="meta"
        )
        module._buffers[name + SCALES] = torch.empty(shape.scale_shape(), dtype=torch.float32, device="meta")
    module._pending_shapes = shapes  # quantized_shapes gains each name once its codes are set
    module._weight_order = list(names)


def set_quantized_weight_(module: nn.Module, name: str, codes: torch.Tensor, scales: torch.Tensor) -> None:
    """Install the codes and scales of weight `name` and drop its float parameter."""
    shape = module._pending_shapes.pop(name)
    if tuple(codes.shape) != shape.qweight_shape() or tuple(scales.shape) != shape.scale_shape():
        raise ValueError(
            f"{name}: quantized tensors {tuple(codes.shape)} / {tuple(scales.shape)} do not fit "
            f"{shape.qweight_shape()} / {shape.scale_shape()}"
        )
    module._parameters.pop(name, None)
    module._buffers[name + CODES] = codes
    module._buffers[name + SCALES] = scales.float()
    _add_in_order(module, name, shape)


def _add_in_order(module: nn.Module, name: str, shape: QuantizedShape) -> None:
    """Keep `quantized_shapes` in the float parameters' registration order, whatever order a loader
    fills them in: PEFT nests its wrappers in that order, and the adapter's keys depend on it."""
    module.quantized_shapes[name] = shape
    order = module._weight_order
    module.quantized_shapes = {n: module.quantized_shapes[n] for n in order if n in module.quantized_shapes}


def finish_pre_quantized_(module: nn.Module) -> None:
    """A module prepared for a pre-quantized checkpoint: its buffers are loaded by name, params go."""
    for name in list(module._pending_shapes):
        module._parameters.pop(name, None)
        _add_in_order(module, name, module._pending_shapes.pop(name))


def quantize_weight(
    module: nn.Module, weight: torch.Tensor, method: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """A float stack as stored by `module` ((E, out, in) or transposed) -> (codes, scales), in chunks of
    experts so that the fp32 working copy stays under QUANTIZE_CHUNK_BYTES."""
    logical = weight.transpose(1, 2) if getattr(module, "is_transposed", False) else weight
    per_expert = 4 * logical[0].numel()
    step = max(1, QUANTIZE_CHUNK_BYTES // per_expert)
    codes = scales = None
    for first in range(0, logical.shape[0], step):
        part_codes, part_scales = quantize(logical[first : first + step], method)
        if codes is None:  # written in place chunk by chunk: never the chunks and their concatenation at once
            codes = part_codes.new_empty(logical.shape[0], *part_codes.shape[1:])
            scales = part_scales.new_empty(logical.shape[0], *part_scales.shape[1:])
        codes[first : first + step] = part_codes
        scales[first : first + step] = part_scales
    return codes, scales


def quantize_experts_(module: nn.Module, method: str) -> nn.Module:
    """Quantize an experts module that holds float weights, in place (see module docstring)."""
    names = fused_weight_names(module)
    if not names:
        raise ValueError(f"{type(module).__name__} has no fused 3D expert weights to quantize")
    dtype = getattr(module, names[0]).dtype
    weights = {n: getattr(module, n).detach() for n in names}
    make_quantized_(module, method, dtype, names)
    for name, weight in weights.items():
        set_quantized_weight_(module, name, *quantize_weight(module, weight, method))
    return module


def dequantized_copy(module: nn.Module) -> nn.Module:
    """A float copy of a quantized experts module (its original class, dequantized weights): what the
    quantized module computes, as a plain module (tests compare the two)."""
    import copy

    stacks = {}
    for name, shape in module.quantized_shapes.items():
        stack = torch.stack([module.dequantize_expert(name, e) for e in range(shape.num_experts)])
        stacks[name] = (
            stack.transpose(1, 2).contiguous() if getattr(module, "is_transposed", False) else stack
        )
    plain = copy.deepcopy(module)
    for key in [k for k in plain._buffers if k.endswith((CODES, SCALES))]:
        del plain._buffers[key]
    for attr in ("quant_method", "compute_dtype", "quantized_shapes", "_pending_shapes", "_weight_order"):
        plain.__dict__.pop(attr, None)
    plain.__class__ = next(c for c in type(module).__mro__ if not issubclass(c, QuantizedExpertsMixin))
    for name, stack in stacks.items():
        plain._parameters[name] = nn.Parameter(stack, requires_grad=False)
    return plain
