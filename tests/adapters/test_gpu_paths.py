"""The CUDA code paths, against their references: `pytest -m gpu` on a machine with a GPU.

On CUDA the routed expert LoRA picks grouped GEMMs by itself (compute capability 8.0 and up), sums
each token's pairs with a gather instead of the CPU's index_add_, and hierarchical sparse attention
takes its general path for every input. Each check is a helper taking the device; the `gpu` tests
run them on CUDA, and the default suite runs the same helpers on the CPU (the `*_on_cpu` tests), so a
helper that is wrong shows up without a GPU too.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from adapters import apply_lora, install_fast_path, remove_fast_path
from adapters.experts import ExpertLora, Routing, forced_backend, routed_experts_forward
from tests.helpers.models import build, random_batch, reference_experts_forward, synthetic_experts
from tests.helpers.sparse import (
    LAYOUTS,
    assert_matches_the_definition,
    attention,
    reference,
    run,
    sparse_config,
)

E, H, INTER, R = 6, 16, 8, 8  # rows of 16+ bytes in fp32 and bf16: the grouped backend may run


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, bf16_error: float = 2e-2) -> None:
    """fp32: elementwise within 1e-4. bf16 (8 bits of mantissa): relative error of the whole tensor
    within `bf16_error`, since single elements that cancel can be off by more than their own size."""
    got, want = got.float(), want.float()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        return
    error = (got - want).norm() / want.norm().clamp(min=1e-12)
    assert error < bf16_error, f"relative error {error:.4f} (shape {tuple(want.shape)})"


@pytest.fixture
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.fail("the gpu marker needs a CUDA device")
    return torch.device("cuda")


def expect_grouped(device: torch.device) -> bool:
    """What "auto" must choose: grouped GEMMs on CUDA from compute capability 8.0, the loop elsewhere."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


class GroupedCalls:
    """Counts the F.grouped_mm calls made by moetune's adapters (not by transformers) while active."""

    def __init__(self, monkeypatch) -> None:
        self.count = 0
        original = torch.nn.functional.grouped_mm

        def counted(*args, **kwargs):
            self.count += sys._getframe(1).f_globals.get("__name__", "").startswith("adapters")
            return original(*args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "grouped_mm", counted)


# ----------------------------------------------------------------------------- routed expert LoRA


def make_experts(device, dtype) -> nn.Module:
    """A transformers experts module (gated, [E, out, in]), frozen, on `device` in `dtype`."""
    experts = synthetic_experts(True, False, False, num_experts=E, hidden=H, width=INTER)
    return experts.to(device=device, dtype=dtype).requires_grad_(False)


def check_routed_experts(device, dtype, monkeypatch, masked: bool, backend: str = "auto") -> None:
    """The routed path with the backend "auto" picks (or a forced one), vs the per-token reference:
    values and gradients.

    masked: an ESFT selection (experts 1 and 4 carry no LoRA: zero factors, as the selection writes them).
    """
    grouped = expect_grouped(device) if backend == "auto" else backend == "grouped"
    experts = make_experts(device, dtype)
    mask = [e not in (1, 4) for e in range(E)] if masked else None
    lora = {}
    for name, (d_out, d_in) in (("gate_up_proj", (2 * INTER, H)), ("down_proj", (H, INTER))):
        a, b = 0.3 * torch.randn(E, R, d_in), 0.3 * torch.randn(E, d_out, R)
        if masked:
            a[[1, 4]], b[[1, 4]] = 0, 0
        lora[name] = ExpertLora(a.to(device).requires_grad_(), b.to(device).requires_grad_(), 2.0, mask)
    logits = torch.randn(24, E)
    logits[:, 3] = -1e9  # expert 3 receives no token
    weights, index = logits.softmax(-1).topk(2, dim=-1)
    weights, index = weights.to(device).requires_grad_(), index.to(device)
    x = torch.randn(24, H, device=device, dtype=dtype, requires_grad=True)
    probe = torch.randn(24, H, device=device)
    leaves = [x, weights] + [t for f in lora.values() for t in (f.lora_a, f.lora_b)]

    calls = GroupedCalls(monkeypatch)
    with forced_backend(backend):
        fast = routed_experts_forward(experts, x, index, weights, lora)
    fast_grads = torch.autograd.grad((fast.float() * probe).sum(), leaves)
    assert (calls.count > 0) == grouped, calls.count
    assert fast.dtype == dtype
    # the reference in fp32 from the same (rounded) values: the fast path computes in `dtype`
    experts32 = make_experts(device, torch.float32)
    experts32.load_state_dict({k: v.float() for k, v in experts.state_dict().items()})
    x32 = x.detach().float().requires_grad_()
    ref = reference_experts_forward(experts32, x32, index, weights, lora)
    ref_grads = torch.autograd.grad((ref * probe).sum(), [x32, *leaves[1:]])

    assert_close(fast, ref, dtype)
    for got, want in zip(fast_grads, ref_grads):
        assert_close(got, want, dtype)
    a_grad, b_grad = fast_grads[2], fast_grads[3]  # gate_up_proj's factors
    assert a_grad[3].abs().sum() == 0 and b_grad[3].abs().sum() == 0  # no token, no gradient
    if masked:  # experts outside the selection stay untouched
        assert all(g[[1, 4]].abs().sum() == 0 for g in fast_grads[2:])
    assert a_grad[0].abs().sum() > 0


def check_sum_per_token(device, dtype) -> None:
    """Routing.sum_per_token (gather + sum off the CPU, index_add_ on it) vs an explicit fp32 sum."""
    index = torch.randint(0, E, (40, 3))
    routing = Routing.build(
        index.to(device), torch.rand(40, 3, device=device), E, grouped=device.type == "cuda"
    )
    y = torch.randn(120, 24, device=device).to(dtype)  # one row per sorted (token, expert) pair
    got = routing.sum_per_token(y)
    want = torch.zeros(40, 24).index_add_(0, routing.token_idx.cpu(), y.float().cpu())
    assert got.dtype == dtype and got.shape == (40, 24)
    assert_close(got.cpu(), want, dtype)


def check_model_lora_matches_plain_peft(family, device, dtype, monkeypatch, esft: bool) -> None:
    """A whole tiny model through the public API: the fast path vs plain PEFT's own forward.

    fp32: logits and every LoRA gradient (both factors random, so A and B both get gradients) agree
    elementwise. bf16: the logits agree within bf16 rounding, and every gradient is finite and
    non-zero; per-expert gradients are not compared there, because the two paths round differently
    and one near-tied token may pick another expert in the next layer (seen on the CPU: one token of
    32, which moves that expert's LoRA gradient by 38%), so the exact bf16 comparison is the
    module-level one, with the routing fixed (`check_routed_experts`).
    """
    model = build(family).to(device=device, dtype=dtype)
    moe_layer = 1 if family == "deepseek_v3" else 0  # DeepSeek-V3's first layer is dense
    selection = {moe_layer: [0, 2, 5]} if esft else None
    peft_model = apply_lora(
        model, targets=["attention", "experts"], r=R, alpha=2 * R, init_lora_weights=False, experts=selection
    )
    batch = {k: v.to(device) for k, v in random_batch(batch=2, length=16).items()}
    params = [p for _, p in peft_model.named_parameters() if p.requires_grad]
    probe = None
    results = []
    for fast in (True, False):
        if not fast:
            remove_fast_path(peft_model)
        calls = GroupedCalls(monkeypatch)
        logits = peft_model(**batch).logits.float()
        probe = torch.randn_like(logits) if probe is None else probe
        results.append((logits, *torch.autograd.grad((logits * probe).sum(), params)))
        if fast:
            assert (calls.count > 0) == expect_grouped(device), calls.count
    install_fast_path(peft_model)
    (fast_logits, *fast_grads), (plain_logits, *plain_grads) = results
    assert_close(fast_logits, plain_logits, dtype)
    if dtype == torch.float32:
        for got, want in zip(fast_grads, plain_grads):
            assert_close(got, want, dtype)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in fast_grads)


@pytest.mark.gpu
@pytest.mark.parametrize("masked", [False, True], ids=["all experts", "ESFT mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_routed_experts_on_cuda_match_the_reference(cuda, dtype, masked, monkeypatch):
    check_routed_experts(cuda, dtype, monkeypatch, masked)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sum_per_token_on_cuda(cuda, dtype):
    check_sum_per_token(cuda, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("esft", [False, True], ids=["all experts", "ESFT"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["moetune", "deepseek_v3"])
def test_model_lora_on_cuda_matches_plain_peft(cuda, family, dtype, esft, monkeypatch):
    check_model_lora_matches_plain_peft(family, cuda, dtype, monkeypatch, esft)


@pytest.mark.parametrize("backend", ["auto", "grouped"], ids=["auto (the loop)", "grouped forced"])
@pytest.mark.parametrize("masked", [False, True], ids=["all experts", "ESFT mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_routed_experts_helper_on_cpu(dtype, masked, backend, monkeypatch):
    """On the CPU "auto" is the loop; forcing the grouped backend also shows the call counter sees it."""
    check_routed_experts(torch.device("cpu"), dtype, monkeypatch, masked, backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sum_per_token_helper_on_cpu(dtype):
    check_sum_per_token(torch.device("cpu"), dtype)


@pytest.mark.parametrize(
    ("dtype", "esft"), [(torch.float32, True), (torch.bfloat16, False)], ids=["fp32-ESFT", "bf16"]
)
def test_model_lora_helper_on_cpu(dtype, esft, monkeypatch):
    check_model_lora_matches_plain_peft("moetune", torch.device("cpu"), dtype, monkeypatch, esft)


# ----------------------------------------------------------------------------- sparse attention


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [0, 12], ids=["default chunks", "small chunks"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sparse_attention_on_cuda_matches_the_definition(cuda, layout, chunk, monkeypatch):
    """Every CUDA input takes the general path: outputs and gradients equal the token-by-token reference."""
    from finetune.modeling import sparse_attention

    monkeypatch.setattr(sparse_attention, "_GLOBAL_CHUNK", chunk)
    config = sparse_config(num_key_value_heads=2)
    assert_matches_the_definition(attention(config).to(cuda), config, layout, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_sparse_attention_on_cuda_bf16_tracks_fp32(cuda):
    config = sparse_config()
    module = attention(config).to(cuda)
    hidden = torch.randn(1, 50, config.hidden_size, device=cuda)
    position_ids = (torch.arange(50, device=cuda) % 25)[None]  # two packed documents
    want = torch.cat([reference(module, config, hidden, a, b) for a, b in ((0, 25), (25, 50))], dim=1)
    got = run(module.bfloat16(), config, hidden.bfloat16(), position_ids)
    torch.testing.assert_close(got.float(), want, rtol=0.02, atol=0.01)


def attention_peak_bytes(device, length: int) -> int:
    """Peak CUDA memory of one forward + backward of the attention on two packed documents, above the
    inputs (CUDA only: the caching allocator counts every tensor; the CPU suite counts the largest
    tensor instead, test_sparse_attention.py::test_memory_grows_linearly_with_length)."""
    config = sparse_config(global_ratio=0.1, local_window=8)
    module = attention(config).to(device)
    hidden = torch.randn(1, length, config.hidden_size, device=device, requires_grad=True)
    position_ids = (torch.arange(length, device=device) % (length // 2))[None]
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    run(module, config, hidden, position_ids).sum().backward()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


@pytest.mark.gpu
def test_sparse_attention_memory_on_cuda_grows_linearly(cuda):
    """From 4096 to 8192 tokens the attention's peak doubles (a T x T/10 tensor would make it ~4x)."""
    attention_peak_bytes(cuda, 1024)  # warm-up: cuBLAS workspaces and the like are not the attention's
    small, large = (attention_peak_bytes(cuda, n) for n in (4096, 8192))
    assert large <= 2.3 * small, (small, large)
