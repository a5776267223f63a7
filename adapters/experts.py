"""LoRA for fused experts: the fast routed computation.

For every routed (token, expert) pair, with X_e the tokens routed to expert e:

    Y_e = X_e W_e^T + b_e + scaling * (X_e A_e^T) B_e^T          A_e: (r, in), B_e: (out, r)

computed only for the routed rows: the pairs are sorted by expert, each expert that received tokens
runs one GEMM for its base weight and two thin GEMMs for its LoRA factors (a Python loop over the hit
experts on the CPU, one grouped_mm per product on CUDA), and no E x out x in delta is ever formed.
The base experts are frozen: backward computes the input gradient and the LoRA gradients, never a
dense expert weight gradient (the extra GEMM that dominates plain PEFT).

How it plugs into PEFT: adapters/expert_fast_path.py (the adapter stays PEFT's own).

Memory: the whole expert MLP is one autograd Function whose backward keeps the layer input x (N, H),
the up projection's output (S, [2]I), the thin LoRA activations (S, r) and the routing; the
k-times larger gather of x, the activation and its output are recomputed, and the expert outputs are
not kept: the routing-weight gradient <dY_s, Y_s> = <q_s, h_s> + <dY_s, b_e>, with
q_s = dY_s W_e + s (dY_s B_e) A_e, which backward computes anyway for dh.

Quantized base weights: an experts module that stores its frozen weights quantized (finetune's
quantized experts, or any module with the same protocol) offers `dequantize_expert(name, e)`, expert
e's (out, in) weight in the compute dtype. The routed path then asks for each hit expert's weight in
the per-expert loop, forward and again in backward (recomputed, never kept), and never sees the
storage format. The grouped path (CUDA) multiplies such a stack in chunks: the experts of a chunk are
dequantized together (at most CHUNK_BYTES), one grouped GEMM runs over their pairs, and the chunk is
freed before the next one.

Shapes: N tokens, k experts per token, S = N * k routed pairs, E experts, H hidden, I expert width.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adapters.errors import MoetuneError

# Parameter names of fused expert weights: gated (gate_up_proj) or ungated (up_proj) first projection.
UP_NAMES = ("gate_up_proj", "up_proj")
DOWN_NAME = "down_proj"


@dataclass
class Routing:
    """Routed pairs sorted by expert (computed once per forward, shared by both projections)."""

    expert_ids: torch.Tensor  # (S,) expert of each sorted pair (ascending)
    token_idx: torch.Tensor  # (S,) token of each sorted pair
    inv_perm: torch.Tensor  # (S,) position of pair (token t, slot j) = t * k + j in the sorted order
    weights: torch.Tensor  # (S,) routing weight of each sorted pair
    offsets: torch.Tensor  # (E,) int32 cumulative pairs per expert, for grouped_mm
    counts: list[int] | None  # pairs per expert, host side, for the per-expert loop (None: grouped)
    num_tokens: int
    top_k: int

    @property
    def grouped(self) -> bool:
        return self.counts is None

    @classmethod
    def build(
        cls, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int, grouped: bool
    ) -> Routing:
        num_tokens, top_k = top_k_index.shape
        expert_ids = top_k_index.reshape(-1)  # (S,)
        sorted_ids, perm = torch.sort(expert_ids, stable=True)
        counts = torch.bincount(sorted_ids, minlength=num_experts)[:num_experts]
        inv_perm = torch.empty_like(perm)
        inv_perm[perm] = torch.arange(perm.numel(), device=perm.device)
        return cls(
            expert_ids=sorted_ids,
            token_idx=perm // top_k,
            inv_perm=inv_perm,
            weights=top_k_weights.reshape(-1)[perm],
            offsets=torch.cumsum(counts, 0, dtype=torch.int32),
            counts=None if grouped else counts.tolist(),  # the loop's one host sync per layer
            num_tokens=num_tokens,
            top_k=top_k,
        )

    def gather(self, x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Rows of x (N, d) for the sorted pairs start:end -> (end - start, d)."""
        return torch.index_select(x, 0, self.token_idx[start:end])

    def sum_per_token(self, y: torch.Tensor) -> torch.Tensor:
        """(S, d) per sorted pair -> (N, d) in y's dtype: the sum of each token's k pairs.

        On CPU a serial index_add_ (deterministic, 3x faster than gather + sum), accumulated in fp32
        for 16-bit inputs; on accelerators the inverse-permutation gather + sum (index_add_ there is
        atomic, hence not deterministic), as transformers does.
        """
        if y.device.type != "cpu":
            return y[self.inv_perm].view(self.num_tokens, self.top_k, -1).sum(1)
        acc = torch.float32 if y.dtype in (torch.bfloat16, torch.float16) else y.dtype
        out = torch.zeros(self.num_tokens, y.shape[-1], dtype=acc, device=y.device)
        return out.index_add_(0, self.token_idx, y.to(acc)).to(y.dtype)

    def chunks(self, experts_per_chunk: int):
        """(first expert, last expert + 1, first row, end row) of consecutive expert ranges, for the
        grouped path over a stack that exists only in pieces (quantized): one host sync per layer."""
        ends = [0, *self.offsets.tolist()]  # ends[e] = first sorted row of expert e
        num_experts = len(ends) - 1
        for e0 in range(0, num_experts, experts_per_chunk):
            e1 = min(e0 + experts_per_chunk, num_experts)
            if ends[e1] > ends[e0]:  # some expert of the chunk received tokens
                yield e0, e1, ends[e0], ends[e1]

    def segments(self, lora_mask: list[bool] | None = None):
        """(expert, start, end) of every expert that received tokens, in sorted order."""
        start = 0
        for expert, count in enumerate(self.counts):
            if count:
                yield expert, start, start + count, (lora_mask is None or lora_mask[expert])
            start += count


@dataclass
class FrozenProjection:
    """The frozen half of one fused expert projection, as the routed path reads it."""

    weight_t: Callable[[int], torch.Tensor]  # expert e -> (in, out) weight in the compute dtype
    stacked_t: torch.Tensor | None  # (E, in, out) view of the whole stack; None when stored quantized
    bias: torch.Tensor | None  # (E, out)
    in_features: int
    out_features: int
    # experts e0:e1 -> (e1 - e0, in, out): the grouped path's pieces of a quantized stack
    chunk_t: Callable[[int, int], torch.Tensor] | None = None
    experts_per_chunk: int = 0  # how many experts one piece holds (a byte budget, see CHUNK_BYTES)

    def grouped_mm(self, rows: torch.Tensor, routing: Routing, transpose: bool = False) -> torch.Tensor:
        """Per sorted pair: rows (S, in) @ W_e^T -> (S, out), or with `transpose` (S, out) @ W_e -> (S, in),
        as grouped GEMMs over the whole stack, or over chunks of dequantized experts."""
        if self.stacked_t is not None:
            weight = self.stacked_t.transpose(1, 2) if transpose else self.stacked_t
            return F.grouped_mm(rows, weight, offs=routing.offsets)
        out = rows.new_empty(rows.shape[0], self.in_features if transpose else self.out_features)
        for e0, e1, r0, r1 in routing.chunks(self.experts_per_chunk):
            weight = self.chunk_t(e0, e1)  # (n, in, out), dequantized now and freed after
            weight = weight.transpose(1, 2) if transpose else weight
            offs = routing.offsets[e0:e1] - r0
            out[r0:r1] = F.grouped_mm(rows[r0:r1], weight, offs=offs)
        return out


@dataclass
class ExpertLora:
    """The LoRA factors of one fused expert parameter, in per-expert form (views of PEFT's tensors)."""

    lora_a: torch.Tensor  # (E, r, in)
    lora_b: torch.Tensor  # (E, out, r)
    scaling: float
    mask: list[bool] | None = None  # mask[e] False: expert e carries no LoRA (ESFT selection)


def _project(inp, frozen: FrozenProjection, lora: ExpertLora | None, routing: Routing):
    """(S, in) -> (S, out) and the LoRA activations u (S, r) (kept for dB; None without LoRA).

    Per hit expert: y_e = inp_e @ W_e^T (+ b_e) + scaling * u_e @ B_e^T, u_e = inp_e @ A_e^T.
    """
    if routing.grouped:  # one grouped GEMM per product; experts outside a selection have zero factors
        offs = routing.offsets
        out = frozen.grouped_mm(inp, routing)  # (S, out)
        if frozen.bias is not None:
            out += frozen.bias[routing.expert_ids]
        u = None
        if lora is not None:
            u = F.grouped_mm(inp, lora.lora_a.transpose(1, 2), offs=offs)  # (S, r)
            out.add_(F.grouped_mm(u, lora.lora_b.transpose(1, 2), offs=offs), alpha=lora.scaling)
        return out, u
    out = inp.new_empty(inp.shape[0], frozen.out_features)
    u = inp.new_zeros(inp.shape[0], lora.lora_a.shape[1]) if lora is not None else None
    for e, s0, s1, with_lora in routing.segments(lora.mask if lora is not None else None):
        x_e, y_e = inp[s0:s1], out[s0:s1]
        torch.mm(x_e, frozen.weight_t(e), out=y_e)  # (n_e, in) @ (in, out)
        if frozen.bias is not None:
            y_e += frozen.bias[e]
        if u is not None and with_lora:
            u_e = torch.mm(x_e, lora.lora_a[e].t(), out=u[s0:s1])  # (n_e, r)
            y_e.addmm_(u_e, lora.lora_b[e].t(), alpha=lora.scaling)
    return out, u


def _project_backward(
    grad, inp, u, frozen: FrozenProjection, lora: ExpertLora | None, routing, needs, row_scale=None
):
    """Gradients of `_project` for its input and its LoRA factors (never for the frozen weight).

    grad (S, out) is g, with dL/dy = g * row_scale. Returns (grad_inp (S, in) or None, grad_a, grad_b):
      grad_inp_e = g_e @ W_e + scaling * (g_e @ B_e) @ A_e       (row_scale NOT applied: caller's job)
      grad_a_e   = scaling * ((g_e @ B_e) * row_scale_e)^T @ inp_e
      grad_b_e   = scaling * g_e^T @ (u_e * row_scale_e)
    `row_scale` (S,) folds the routing weight into the LoRA gradients without forming g * w (S, out).
    `inp` is a callable (start, end) -> rows of the input, so callers can re-gather instead of keeping it.
    A quantized W_e is dequantized again here (recomputed, not kept from the forward).
    """
    need_input, need_a, need_b = needs
    has_lora = lora is not None and (need_a or need_b or need_input)
    if routing.grouped:
        return _project_backward_grouped(grad, inp, u, frozen, lora, routing, needs, row_scale)
    grad_inp = grad.new_empty(grad.shape[0], frozen.in_features) if need_input else None
    grad_a = torch.zeros_like(lora.lora_a) if lora is not None and need_a else None
    grad_b = torch.zeros_like(lora.lora_b) if lora is not None and need_b else None
    if has_lora and need_b and row_scale is not None:
        u = u * row_scale[:, None]  # (S, r), once rather than per expert
    for e, s0, s1, with_lora in routing.segments(lora.mask if lora is not None else None):
        g_e = grad[s0:s1]
        if need_input:
            torch.mm(g_e, frozen.weight_t(e).t(), out=grad_inp[s0:s1])  # (n_e, out) @ (out, in)
        if not (has_lora and with_lora):
            continue
        gb = g_e @ lora.lora_b[e]  # (n_e, r)
        if need_input:
            grad_inp[s0:s1].addmm_(gb, lora.lora_a[e], alpha=lora.scaling)
        if need_a:
            if row_scale is not None:
                gb = gb * row_scale[s0:s1, None]
            torch.addmm(grad_a[e], gb.t(), inp(s0, s1), beta=0, alpha=lora.scaling, out=grad_a[e])
        if need_b:
            torch.addmm(grad_b[e], g_e.t(), u[s0:s1], beta=0, alpha=lora.scaling, out=grad_b[e])
    return grad_inp, grad_a, grad_b


def _project_backward_grouped(grad, inp, u, frozen, lora, routing, needs, row_scale):
    """`_project_backward` with grouped GEMMs; the 2D x 2D form groups the pair dimension (dA, dB)."""
    need_input, need_a, need_b = needs
    offs = routing.offsets
    grad_inp = frozen.grouped_mm(grad, routing, transpose=True) if need_input else None
    grad_a = grad_b = None
    if lora is not None and (need_input or need_a or need_b):
        gb = F.grouped_mm(grad, lora.lora_b, offs=offs)  # (S, r)
        if need_input:
            grad_inp.add_(F.grouped_mm(gb, lora.lora_a, offs=offs), alpha=lora.scaling)
        if row_scale is not None:
            gb = gb * row_scale[:, None]
            u = u * row_scale[:, None]
        if need_a:
            grad_a = F.grouped_mm(gb.t(), inp(0, None), offs=offs).mul_(lora.scaling)  # (E, r, in)
        if need_b:
            grad_b = F.grouped_mm(grad.t(), u, offs=offs).mul_(lora.scaling)  # (E, out, r)
    return grad_inp, grad_a, grad_b


class _RoutedExpertsLora(torch.autograd.Function):
    """x (N, H) -> gather pairs -> up projection -> activation -> down projection -> weighted sum (N, H).

    One Function for the whole expert MLP so that backward keeps only x, the up projection's output
    (S, [2]I), the thin LoRA activations (S, r) and the routing weights: the gather of x, the
    activation and its output are recomputed (cheap elementwise work), the frozen weights get no
    gradient, and the routing-weight gradient <dL/dy_s, y_s> comes from q_s = g_s W_e + s (g_s B_e) A_e
    (needed for dh anyway) as <q_s, h_s> + <g_s, b_e>. `act` is the experts module's gate or
    activation; its backward is taken by autograd on the recomputed values, so any gate works.
    The LoRA factors are explicit inputs (autograd hands them their gradients); `spec` carries the
    frozen projections, the LoRA scalings and masks, the activation and the routing.
    """

    @staticmethod
    def forward(ctx, x, weights, a_up, b_up, a_dn, b_dn, spec: _MlpSpec):
        lora_up, lora_dn = spec.lora(a_up, b_up, a_dn, b_dn)
        routing = spec.routing
        proj, u_up = _project(routing.gather(x), spec.up, lora_up, routing)  # (S, [2]I)
        y, u_dn = _project(spec.act(proj), spec.down, lora_dn, routing)  # (S, H)
        y = y.to(torch.promote_types(y.dtype, weights.dtype)).mul_(weights.unsqueeze(-1))
        ctx.save_for_backward(x, weights, proj, u_up, u_dn, a_up, b_up, a_dn, b_dn)
        ctx.spec = spec
        return routing.sum_per_token(y).to(x.dtype)  # (N, H)

    @staticmethod
    def backward(ctx, grad_out):
        x, weights, proj, u_up, u_dn, a_up, b_up, a_dn, b_dn = ctx.saved_tensors
        spec = ctx.spec
        lora_up, lora_dn = spec.lora(a_up, b_up, a_dn, b_dn)
        routing = spec.routing
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_up, need_dn = any(ctx.needs_input_grad[2:4]), any(ctx.needs_input_grad[4:6])

        with torch.enable_grad():  # the activation again, this time with its graph
            proj = proj.detach().requires_grad_()
            h_graph = spec.act(proj)
        h = h_graph.detach()  # (S, I)

        # down projection: dL/dy_s = w_s * g_s with g_s the token's incoming gradient
        g = routing.gather(grad_out.contiguous()).to(h.dtype)  # (S, H)
        scale = weights.to(h.dtype)
        needs_dn = (need_x or need_w or need_up, need_dn, need_dn)  # (input, A, B)
        q, grad_a_dn, grad_b_dn = _project_backward(
            g, lambda s0, s1: h[s0:s1], u_dn, spec.down, lora_dn, routing, needs_dn, row_scale=scale
        )
        grad_w = None
        if need_w:
            grad_w = (q.float() * h.float()).sum(-1)
            if spec.down.bias is not None:
                grad_w += (g.float() * spec.down.bias[routing.expert_ids].float()).sum(-1)
            grad_w = grad_w.to(weights.dtype)
        del g

        grad_x = grad_a_up = grad_b_up = None
        if need_x or need_up:
            grad_h = q.mul_(scale.unsqueeze(-1))
            (grad_proj,) = torch.autograd.grad(h_graph, proj, grad_h)  # (S, [2]I)

            def x_rows(s0: int, s1: int) -> torch.Tensor:  # the pairs' inputs, re-gathered rather than kept
                return routing.gather(x, s0, s1)

            grad_xs, grad_a_up, grad_b_up = _project_backward(
                grad_proj.contiguous(), x_rows, u_up, spec.up, lora_up, routing, (need_x, need_up, need_up)
            )
            if grad_xs is not None:
                grad_x = routing.sum_per_token(grad_xs)  # each token collects its k pairs' gradients
        return grad_x, grad_w, grad_a_up, grad_b_up, grad_a_dn, grad_b_dn, None


@dataclass
class _MlpSpec:
    """Everything about one expert MLP call that is not a tensor autograd tracks."""

    up: FrozenProjection
    down: FrozenProjection
    scaling_up: float
    scaling_down: float
    mask_up: list[bool] | None
    mask_down: list[bool] | None
    act: Callable[[torch.Tensor], torch.Tensor]  # (S, [2]I) -> (S, I): the gate or the activation
    routing: Routing

    def lora(self, a_up, b_up, a_dn, b_dn) -> tuple[ExpertLora | None, ExpertLora | None]:
        up = ExpertLora(a_up, b_up, self.scaling_up, self.mask_up) if a_up is not None else None
        down = ExpertLora(a_dn, b_dn, self.scaling_down, self.mask_down) if a_dn is not None else None
        return up, down


# Dequantized experts the grouped path holds at once (a chunk of the stack) when weights are quantized.
CHUNK_BYTES = 256 * 2**20
BACKENDS = ("auto", "loop", "grouped")
# "auto" (each module's own choice, `set_experts_backend`), or "loop" / "grouped" forced on any device
# by `forced_backend`; and the chunk budget of the grouped path (see `forced_backend`).
_FORCED: ContextVar[str] = ContextVar("moetune_forced_experts_backend", default="auto")
_CHUNK_BYTES: ContextVar[int] = ContextVar("moetune_experts_chunk_bytes", default=CHUNK_BYTES)


@contextmanager
def forced_backend(backend: str, *, chunk_bytes: int | None = None) -> Iterator[None]:
    """Run every routed computation started inside the block with `backend`, on any device.

    "loop" (per-expert GEMMs) or "grouped" (grouped GEMMs; torch's grouped_mm also runs on the CPU,
    which is how the tests check both paths there); "auto" restores each module's own choice.
    `chunk_bytes` caps the dequantized experts the grouped path holds at once for quantized weights
    (default CHUNK_BYTES). Per-module choices for training are `set_experts_backend`'s job; this
    overrides them, for tests and benchmarks. The choice is made in the forward pass, so the block
    need not cover backward.
    """
    if backend not in BACKENDS:
        raise MoetuneError(f"experts backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    forced = _FORCED.set(backend)
    chunk = _CHUNK_BYTES.set(CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes))
    try:
        yield
    finally:
        _FORCED.reset(forced)
        _CHUNK_BYTES.reset(chunk)


def use_grouped_mm(x: torch.Tensor, dims: list[int] | None = None, backend: str = "auto") -> bool:
    """Whether to run the grouped backend for input x; `dims` (widths, ranks) must give 16-byte rows.

    `backend` is the experts module's choice (`set_experts_backend`); a `forced_backend` block
    overrides it. "auto": grouped GEMMs on CUDA (one kernel per product instead of a Python loop over
    experts), the per-expert loop on the CPU (where torch's grouped_mm is itself a loop and measured
    no faster, and the loop can skip experts outside an ESFT selection)."""
    if dims is not None and any(d * x.element_size() % 16 for d in dims):
        return False  # grouped_mm needs 16-byte aligned strides
    forced = _FORCED.get()
    if forced != "auto":
        return forced == "grouped"
    if backend != "auto":
        return backend == "grouped"
    if not hasattr(F, "grouped_mm") or x.device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(x.device) >= (8, 0)


def routed_experts_forward(
    experts: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    lora: dict[str, ExpertLora],
) -> torch.Tensor:
    """The experts module's forward with LoRA on its fused weights, for the routed tokens only.

    `experts` is a transformers experts module (flags `has_gate`, `has_bias`, `is_transposed`,
    `_apply_gate`, `act_fn`); `lora` maps parameter names (gate_up_proj / up_proj / down_proj) to
    their factors (a missing name: no LoRA on that weight).
    hidden_states (N, H), top_k_index / top_k_weights (N, k) -> (N, H).
    """
    has_gate = getattr(experts, "has_gate", True)
    up_name = "gate_up_proj" if has_gate else "up_proj"
    up, down = frozen_projection(experts, up_name), frozen_projection(experts, DOWN_NAME)
    num_experts = getattr(experts, up_name).shape[0]
    dims = [up.in_features, up.out_features, down.out_features]
    dims += [f.lora_a.shape[1] for f in lora.values()]  # ranks
    grouped = use_grouped_mm(hidden_states, dims, getattr(experts, "experts_backend", "auto"))
    routing = Routing.build(top_k_index, top_k_weights, num_experts, grouped)
    # Like transformers' grouped_mm path: compute in the expert weights' dtype (also under autocast,
    # which the GEMMs below bypass), and hand back the caller's dtype.
    dtype = getattr(experts, up_name).dtype

    def factors(name):
        if name not in lora:
            return None, None, 0.0, None
        f = lora[name]
        # PEFT's B is a strided view (columns e, e+E, ...): one small contiguous copy per forward keeps
        # every per-expert GEMM on the BLAS fast path.
        return f.lora_a.to(dtype).contiguous(), f.lora_b.to(dtype).contiguous(), f.scaling, f.mask

    a_up, b_up, s_up, m_up = factors(up_name)
    a_dn, b_dn, s_dn, m_dn = factors(DOWN_NAME)
    act = experts._apply_gate if has_gate else experts.act_fn  # (S, [2]I) -> (S, I)
    spec = _MlpSpec(up, down, s_up, s_dn, m_up, m_dn, act, routing)
    x = hidden_states.to(dtype)
    with torch.autocast(device_type=x.device.type, enabled=False):
        out = _RoutedExpertsLora.apply(x, routing.weights, a_up, b_up, a_dn, b_dn, spec)
    return out.to(hidden_states.dtype)


def frozen_projection(experts: nn.Module, name: str) -> FrozenProjection:
    """How the routed path reads the frozen weight `name` of an experts module.

    A float stack ((E, out, in), or (E, in, out) when `is_transposed`) is viewed as (E, in, out); a
    module that stores it quantized dequantizes one expert at a time (`dequantize_expert(name, e)`
    gives (out, in) in the compute dtype).
    """
    weight = getattr(experts, name)  # for a quantized module: a placeholder of the float shape
    transposed = getattr(experts, "is_transposed", False)
    num_experts, first, second = weight.shape
    in_features, out_features = (first, second) if transposed else (second, first)
    bias = getattr(experts, f"{name}_bias").detach() if getattr(experts, "has_bias", False) else None
    if name in getattr(experts, "quantized_shapes", {}):
        per_chunk = max(1, _CHUNK_BYTES.get() // (in_features * out_features * weight.element_size()))
        return FrozenProjection(
            lambda e: experts.dequantize_expert(name, e).t(),  # (in, out)
            None,
            bias,
            in_features,
            out_features,
            chunk_t=lambda e0, e1: experts.dequantize_experts(name, e0, e1).transpose(1, 2),  # (n, in, out)
            experts_per_chunk=per_chunk,
        )
    stacked_t = (weight if transposed else weight.transpose(-2, -1)).detach()  # (E, in, out)
    return FrozenProjection(stacked_t.__getitem__, stacked_t, bias, in_features, out_features)
