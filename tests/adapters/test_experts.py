"""The routed expert LoRA computation: values and gradients against explicit references.

Layout variants (gated gate_up_proj / ungated up_proj, [E, out, in] / transposed [E, in, out],
with / without biases) run on synthetic transformers experts modules, both against the explicit
per-token reference (tests/helpers/models.py: reference_experts_forward) and against PEFT's own ParamWrapper
path through transformers' grouped_mm experts implementation.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from adapters.expert_fast_path import fast_path_modules, install_fast_path, remove_fast_path
from adapters.experts import forced_backend, routed_experts_forward
from tests.helpers.models import (
    EXPERT_LAYOUT_IDS,
    EXPERT_LAYOUTS,
    expert_lora,
    expert_routing,
    experts_output_and_grads,
    reference_experts_forward,
    synthetic_experts,
)

E, H, INTER, R = 6, 12, 8, 4  # 16-byte rows in fp32: the grouped backend runs


def make_experts(has_gate: bool, transposed: bool, has_bias: bool) -> nn.Module:
    return synthetic_experts(has_gate, transposed, has_bias, num_experts=E, hidden=H, width=INTER)


@pytest.fixture(params=["loop", "grouped"])
def backend(request):
    """Both expert backends: the per-expert loop (CPU default) and grouped_mm (CUDA default)."""
    with forced_backend(request.param):
        yield request.param


@pytest.mark.parametrize(("has_gate", "transposed", "has_bias"), EXPERT_LAYOUTS, ids=EXPERT_LAYOUT_IDS)
def test_values_and_gradients_match_explicit_reference(has_gate, transposed, has_bias, backend):
    experts = make_experts(has_gate, transposed, has_bias).requires_grad_(False)
    lora = expert_lora(experts, R)
    index, weights = expert_routing(9, E)
    weights.requires_grad_()
    x = torch.randn(9, H, requires_grad=True)
    probe = torch.randn(9, H)

    fast, fast_grads = experts_output_and_grads(
        routed_experts_forward, experts, x, index, weights, lora, probe
    )
    ref, ref_grads = experts_output_and_grads(
        reference_experts_forward, experts, x, index, weights, lora, probe
    )

    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(fast_grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # the expert that received no token has zero LoRA gradients
    assert fast_grads[2][4].abs().sum() == 0 and fast_grads[3][4].abs().sum() == 0


def test_masked_experts_get_no_delta_and_no_gradient(backend):
    experts = make_experts(True, False, False).requires_grad_(False)
    mask = [True, False, True, True, False, True]
    lora = expert_lora(experts, R, mask=mask)
    if backend == "grouped":  # grouped GEMMs rely on the zero factors an ESFT selection writes
        with torch.no_grad():
            for f in lora.values():
                f.lora_a[[1, 4]] = 0
                f.lora_b[[1, 4]] = 0
    index, weights = expert_routing(16, E, skip=())
    x = torch.randn(16, H, requires_grad=True)
    fast = routed_experts_forward(experts, x, index, weights, lora)
    ref = reference_experts_forward(experts, x, index, weights, lora)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    fast.square().sum().backward()
    for f in lora.values():
        assert f.lora_a.grad[1].abs().sum() == 0 and f.lora_b.grad[4].abs().sum() == 0
        assert f.lora_a.grad[0].abs().sum() > 0


def test_base_experts_keep_no_gradient_and_weights_get_one():
    experts = make_experts(True, False, True)  # requires_grad left on: the fast path must not use it
    lora = expert_lora(experts, R)
    index, weights = expert_routing(8, E)
    weights.requires_grad_()
    x = torch.randn(8, H, requires_grad=True)
    routed_experts_forward(experts, x, index, weights, lora).square().sum().backward()
    assert all(p.grad is None for p in experts.parameters())
    assert weights.grad is not None and weights.grad.abs().sum() > 0
    assert x.grad is not None


def test_bf16_tracks_fp32(backend):
    experts = make_experts(True, False, False).requires_grad_(False)
    lora = expert_lora(experts, R)
    index, weights = expert_routing(32, E, skip=())
    x = torch.randn(32, H)
    want = routed_experts_forward(experts, x, index, weights, lora)
    experts_bf16 = experts.to(torch.bfloat16)
    got = routed_experts_forward(experts_bf16, x.bfloat16(), index, weights, lora)  # fp32 LoRA, bf16 compute
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)
    got.float().square().sum().backward()
    assert all(
        f.lora_a.grad.dtype == torch.float32 and torch.isfinite(f.lora_a.grad).all() for f in lora.values()
    )


class _Block(nn.Module):
    def __init__(self, experts):
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.experts = experts


class _Tiny(nn.Module):
    """A one-layer container so PEFT can wrap the synthetic experts by parameter name."""

    def __init__(self, experts):
        super().__init__()
        self.layers = nn.ModuleList([_Block(experts)])

    def forward(self, x, index, weights):
        return self.layers[0].mlp.experts(x, index, weights)


def _peft_tiny(experts, params, which="lora_"):
    """PEFT's own ParamWrappers on `params` of a one-layer container; `which` factors get random values."""
    config = LoraConfig(r=R, lora_alpha=6, target_modules=[], target_parameters=params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(_Tiny(experts), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if which in name:
                p.normal_(0.0, 0.3)
    return peft_model


@pytest.mark.parametrize(("has_gate", "transposed", "has_bias"), EXPERT_LAYOUTS, ids=EXPERT_LAYOUT_IDS)
def test_fast_path_matches_peft_param_wrapper(has_gate, transposed, has_bias, backend):
    """PEFT's ParamWrapper (W + s·B·A through transformers' grouped_mm) is the semantic reference."""
    up = "gate_up_proj" if has_gate else "up_proj"
    peft_model = _peft_tiny(
        make_experts(has_gate, transposed, has_bias), [f"experts.{up}", "experts.down_proj"]
    )
    index, weights = expert_routing(10, E)
    x = torch.randn(10, H, requires_grad=True)
    probe = torch.randn(10, H)
    lora_params = [p for n, p in peft_model.named_parameters() if "lora_" in n]

    def run():
        out = peft_model.base_model.model(x, index, weights)
        return out, torch.autograd.grad((out * probe).sum(), [x, *lora_params])

    want, want_grads = run()
    assert install_fast_path(peft_model) == 1
    assert fast_path_modules(peft_model)
    got, got_grads = run()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    remove_fast_path(peft_model)
    assert not fast_path_modules(peft_model)


def test_fast_path_falls_back_when_adapters_disabled():
    peft_model = _peft_tiny(
        make_experts(True, False, False), ["experts.gate_up_proj", "experts.down_proj"], "lora_B"
    )
    model = peft_model.base_model.model
    install_fast_path(peft_model)
    index, weights = expert_routing(6, E)
    x = torch.randn(6, H)
    with torch.no_grad():
        adapted = peft_model.base_model.model(x, index, weights)
        with peft_model.disable_adapter():
            base = peft_model.base_model.model(x, index, weights)
        plain = reference_experts_forward(model.layers[0].mlp.experts.get_base_layer(), x, index, weights, {})
    torch.testing.assert_close(base, plain, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(adapted, base)


def test_forced_backend_picks_the_path_and_ends_with_its_block(monkeypatch):
    import torch.nn.functional as F

    calls = []
    real = F.grouped_mm
    monkeypatch.setattr(F, "grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    experts = make_experts(True, False, False).requires_grad_(False)
    lora = expert_lora(experts, R)
    index, weights = expert_routing(5, E)
    x = torch.randn(5, H)

    def grouped_calls() -> int:
        calls.clear()
        with torch.no_grad():
            routed_experts_forward(experts, x, index, weights, lora)
        return len(calls)

    assert grouped_calls() == 0  # auto on the CPU: the per-expert loop
    with forced_backend("grouped"):
        assert grouped_calls() > 0
        with forced_backend("loop"):
            assert grouped_calls() == 0
        assert grouped_calls() > 0
    assert grouped_calls() == 0
