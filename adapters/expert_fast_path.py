"""Routing PEFT's expert LoRA through the fast routed computation (adapters/experts.py).

Why it is done this way: the adapter is built by PEFT itself (`LoraConfig.target_parameters`,
so `lora.ParamWrapper` owns lora_A / lora_B, the state-dict keys, save / load / merge / unload),
and `install_fast_path` only replaces the *instance* `forward` of the outermost ParamWrapper on each
experts module. Registering an implementation in transformers' ExpertsInterface would not be enough:
ParamWrapper.forward would still build W + s·B·A before calling the experts, and the experts
module cannot see its wrappers. Swapping the wrapper's class would break PEFT's checks by class name.
A plain `PeftModel.from_pretrained` therefore loads our adapters unchanged and runs PEFT's own
(slow, equivalent) path; anything the fast path does not cover (merged, disabled, several active
adapters) falls back to PEFT's forward.

This module owns that glue: switching the wrappers (`install_fast_path` / `remove_fast_path`), reading
their factors per expert (`peft_factors`, via adapters/peft_format.py's layout), the ESFT mask, the
per-model backend choice (`set_experts_backend`) and the placeholders quantized experts show PEFT.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch.nn.functional as F
from torch import nn

from adapters.errors import MoetuneError
from adapters.experts import (
    BACKENDS,
    DOWN_NAME,
    UP_NAMES,
    ExpertLora,
    routed_experts_forward,
    use_grouped_mm,
)
from adapters.peft_format import experts_with_lora, split_experts


def peft_factors(wrapper: nn.Module, adapter: str, with_mask: bool = True) -> ExpertLora:
    """Per-expert views of a PEFT ParamWrapper's lora_A (r*E, in) and lora_B (out, r*E)
    (`adapters.peft_format.split_experts`)."""
    lora_a, lora_b = split_experts(
        wrapper.lora_A[adapter].weight, wrapper.lora_B[adapter].weight, wrapper.num_experts
    )  # (E, r, in), (E, out, r)
    mask = expert_lora_mask(wrapper, adapter) if with_mask else None
    return ExpertLora(lora_a, lora_b, float(wrapper.scaling[adapter]), mask)


def expert_lora_mask(wrapper: nn.Module, adapter: str) -> list[bool] | None:
    """Which experts of a ParamWrapper carry LoRA: those whose A block is not all zero.

    An ESFT selection zeroes A and B of the other experts (exactly a zero delta, and zero gradients
    for both factors, so they stay zero under AdamW); deriving the mask from the weights keeps it
    right after save / load with no extra state. None when every expert carries LoRA.
    """
    weight_a = wrapper.lora_A[adapter].weight  # (r*E, in)
    if weight_a.device.type == "meta":  # a model built for planning has no values to look at
        return None
    mask = experts_with_lora(weight_a.view(wrapper.num_experts, -1, weight_a.shape[-1]))
    return None if all(mask) else mask


def wrapper_chain(wrapper: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    """The nested ParamWrappers from the outermost in, and the experts module they wrap."""
    from peft.tuners.lora.layer import ParamWrapper

    chain = []
    module = wrapper
    while isinstance(module, ParamWrapper):
        chain.append(module)
        module = module.base_layer
    return chain, module


def _fast_forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
    """Instance forward of the outermost ParamWrapper on an experts module (see module docstring)."""
    chain, experts = wrapper_chain(self)
    active = [a for a in self.active_adapters if a in self.lora_A]
    usable = (
        not args
        and not kwargs
        and len(active) == 1
        and all(not w.disable_adapters and not w.merged and active[0] in w.lora_A for w in chain)
        and all(w.num_experts > 1 for w in chain)
    )
    if not usable:
        disabled = all(w.disable_adapters for w in chain)
        if getattr(experts, "quantized_shapes", None) and not disabled:
            # PEFT's own path would fold LoRA into the (quantized, hence placeholder) weight
            raise NotImplementedError(
                f"LoRA on quantized experts runs only through moetune's routed path: one active adapter, "
                f"unmerged, called as experts(hidden, top_k_index, top_k_weights) (active: {active})"
            )
        return type(self).forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs)
    # the mask only lets the per-expert loop skip unselected experts; grouped GEMMs need no host sync for
    # it (a rank that forbids grouping then costs the skip)
    with_mask = not use_grouped_mm(hidden_states, backend=getattr(experts, "experts_backend", "auto"))
    lora = {w.parameter_name: peft_factors(w, active[0], with_mask) for w in chain}
    return routed_experts_forward(experts, hidden_states, top_k_index, top_k_weights, lora)


def install_fast_path(model: nn.Module) -> int:
    """Route every PEFT-wrapped fused experts module of `model` through `routed_experts_forward`.

    Only the outermost ParamWrapper of each experts module is switched (it is the one called).
    Experts modules that are not transformers experts modules (no `_apply_gate` / `act_fn`) or
    that apply a post-expert norm keep PEFT's own path. Returns the number of modules switched;
    idempotent; `remove_fast_path` undoes it.
    """
    from peft.tuners.lora.layer import ParamWrapper

    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    inner = {id(w.base_layer) for w in wrappers}
    count = 0
    for wrapper in wrappers:
        if id(wrapper) in inner:
            continue
        chain, experts = wrapper_chain(wrapper)
        if not all(w.parameter_name in (*UP_NAMES, DOWN_NAME) and w.num_experts > 1 for w in chain):
            continue
        if not fast_path_supports(experts):
            continue
        wrapper.forward = types.MethodType(_fast_forward, wrapper)
        count += 1
    return count


def fast_path_supports(experts: nn.Module) -> bool:
    """A transformers fused-experts module whose computation `routed_experts_forward` reproduces."""
    has_gate = getattr(experts, "has_gate", None)
    if has_gate is None or getattr(experts, "has_post_expert_norm", False):
        return False
    if getattr(experts, "_is_expert_parallel", False):  # EP sentinels: transformers' own path handles them
        return False
    if not hasattr(experts, "_apply_gate" if has_gate else "act_fn"):  # the gate carries its activation
        return False
    return hasattr(experts, DOWN_NAME)


@contextmanager
def exposed_quantized_weights(model: nn.Module) -> Iterator[None]:
    """While PEFT searches `model` for target parameters by name, quantized experts modules register
    frozen placeholders of their float weights (see finetune.quantization.experts)."""
    with ExitStack() as stack:
        for module in model.modules():
            if getattr(module, "quantized_shapes", None) and hasattr(module, "exposed_parameters"):
                stack.enter_context(module.exposed_parameters())
        yield


def remove_fast_path(model: nn.Module) -> None:
    """Back to PEFT's own ParamWrapper forward (used by the parity tests and benchmarks)."""
    for module in model.modules():
        if "forward" in module.__dict__ and getattr(module.forward, "__func__", None) is _fast_forward:
            del module.forward


def fast_path_modules(model: nn.Module) -> list[str]:
    """Names of the experts wrappers that run the routed LoRA path."""
    return [
        name
        for name, module in model.named_modules()
        if getattr(module.__dict__.get("forward"), "__func__", None) is _fast_forward
    ]


def set_experts_backend(model: nn.Module, backend: str) -> int:
    """Choose the routed computation for every experts module of `model`: "auto" (grouped GEMMs on
    CUDA, the per-expert loop on the CPU), "loop" or "grouped" (CUDA only). Returns modules set."""
    if backend not in BACKENDS:
        raise MoetuneError(f"experts backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    modules = [m for m in model.modules() if fast_path_supports(m)]
    if backend == "grouped":
        devices = {p.device.type for m in modules for p in m.buffers()} | {
            p.device.type for m in modules for p in m.parameters(recurse=False)
        }
        if devices != {"cuda"} or not hasattr(F, "grouped_mm"):
            raise MoetuneError(
                f"experts backend 'grouped' runs grouped GEMMs on CUDA GPUs, but the experts are on {sorted(devices)}; "
                "use auto (the per-expert loop on the CPU) or loop"
            )
    for module in modules:
        module.experts_backend = backend
    return len(modules)
