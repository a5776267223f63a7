"""Bytes of a model's weights by adapter group, stored in the load dtype or with quantized experts.

Computed from the model built on the meta device (no weights): every parameter counts in the load
dtype, except the routed experts' fused stacks, which count as `QuantizedShape.nbytes` (codes + fp32
scales) when a quantization method is given. `info` and `plan` print these numbers.
"""

from __future__ import annotations

from torch import nn

from finetune.quantization.experts import WEIGHT_NAMES, quantizable, quantized_shape

OTHER = "other"  # embeddings, norms, lm_head, biases: whatever no adapter group names


def _group_of_parameters(model: nn.Module) -> dict[str, str]:
    """Parameter name -> adapter group (attention, experts, ...; `other` for the rest)."""
    from adapters.targets import find_targets

    groups: dict[str, str] = {}
    for target in find_targets(model):
        if target.kind == "parameter":
            groups[target.name] = target.group
        else:
            for name, _ in model.get_submodule(target.name).named_parameters():
                groups[f"{target.name}.{name}"] = target.group
    return groups


def weight_bytes_by_group(model: nn.Module, bytes_per_weight: int, method: str | None) -> dict[str, int]:
    """{group: bytes} for `model` (float weights of `bytes_per_weight` bytes; experts by `method`)."""
    groups = _group_of_parameters(model)
    quantized: dict[str, int] = {}
    if method is not None:
        for module_name, module in model.named_modules():
            if not quantizable(module):
                continue
            for name, param in module.named_parameters(recurse=False):
                if name in WEIGHT_NAMES and param.ndim == 3:
                    shape = quantized_shape(module, name, method, tuple(param.shape))
                    quantized[f"{module_name}.{name}"] = shape.nbytes()
    from adapters.targets import ALL_GROUPS

    totals = dict.fromkeys((*ALL_GROUPS, OTHER), 0)
    for name, param in model.named_parameters():
        group = groups.get(name, OTHER)
        totals[group] += quantized.get(name, param.numel() * bytes_per_weight)
    return {group: size for group, size in totals.items() if size}
