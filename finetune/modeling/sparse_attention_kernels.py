"""The kernels of hierarchical sparse attention (sparse_attention.py): autograd Functions and layouts.

`Layout` reads the documents of a batch from `padding_mask` / `position_ids`; `LocalWindow` is the
local branch (a pass per window offset over views, probabilities recomputed in backward a chunk of
rows at a time); `BlockSparse` is the CPU fast path for one document per row (local + global + gate
fused, the global branch through the causal flash-attention kernel); `SummaryPlan` and
`GlobalChunked` are the general path's global branch, a chunk of query rows at a time. The module
docstring of sparse_attention.py explains the design and its cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Layout:
    """Where the documents are, for every cached + current token of each row (B, T_all)."""

    real: torch.Tensor  # bool: a real token (not padding)
    local_idx: torch.Tensor  # long: tokens since the start of the token's document
    regular: bool  # one document from index 0 per row (right padding at most), no cache: fast path

    @classmethod
    def build(
        cls,
        padding_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        batch: int,
        past: int,
        total: int,
        device: torch.device,
    ) -> Layout:
        if padding_mask is None:
            real = torch.ones(batch, total, dtype=torch.bool, device=device)
        else:
            if padding_mask.dim() != 2 or padding_mask.shape[-1] != total:
                raise ValueError(
                    "hierarchical_sparse attention needs a 2D attention_mask [batch, cached + new tokens] "
                    f"(1 = real token); got shape {tuple(padding_mask.shape)} for {total} tokens"
                )
            real = padding_mask.to(device=device, dtype=torch.bool).expand(batch, total)
        restart = torch.zeros(batch, total, dtype=torch.bool, device=device)
        if position_ids is not None:  # packed documents restart their positions at 0
            restart[:, past:] = (position_ids == 0).to(device).expand(batch, total - past)
        previous_real = F.pad(real[:, :-1], (1, 0), value=False)
        start = real & (restart | ~previous_real)
        start[:, 0] = True
        index = torch.arange(total, device=device).expand(batch, total)
        local_idx = index - torch.where(start, index, 0).cummax(dim=1).values
        regular = past == 0 and bool((local_idx == index).all())
        return cls(real=real, local_idx=local_idx, regular=regular)


def _window_steps(length: int, base: int, window: int):
    """Per offset o: the first query with a key o steps back, and the slice of those keys.

    Queries are 0 .. length-1 and query i's own key sits at index base + i of the key tensor.
    """
    for o in range(window):
        first = max(0, o - base)
        if first >= length:  # no query reaches that far back (a sequence shorter than the window)
            return
        yield o, first, slice(first + base - o, length + base - o)


def _rowdot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-row dot products: x (B, nKV, g, T, D) . y (B, nKV, 1, T, D) over D -> (B, nKV, g, T).

    One batched matmul per batch row over the (T, nKV) axes, which for q / k / v laid out as the
    projections write them (B, T, heads, D) are plain views: no product tensor, no copy.
    """
    rows = [torch.matmul(xb.permute(2, 0, 1, 3), yb.permute(2, 0, 3, 1)) for xb, yb in zip(x, y)]
    return torch.stack([r[..., 0].permute(1, 2, 0) for r in rows])  # (T, nKV, g, 1) -> (nKV, g, T)


def _group_sum(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum over the GQA group of weight (B, nKV, g, T, 1) * x (B, nKV, g, T, D) -> (B, nKV, 1, T, D)."""
    rows = [torch.matmul(wb.permute(2, 0, 3, 1), xb.permute(2, 0, 1, 3)) for wb, xb in zip(weight, x)]
    return torch.stack([r.permute(1, 2, 0, 3) for r in rows])  # (T, nKV, 1, D) -> (nKV, 1, T, D)


# The local backward recomputes the window probabilities a chunk of query rows at a time. A chunk's
# (rows x heads x window) fp32 buffers hold 1/LOCAL_SHARE of the queries' elements (at least
# LOCAL_CHUNK): a few percent of the peak, and a fixed number of chunks at any length (4 at head dim
# 64 and window 8), each ~100 small operations. Every operation is a fork / join of the intra-op
# threads; the 64 KiB chunks used before made that thousands per backward (80 chunks at 20480 tokens),
# and the backward's wall time hostage to how the threads were scheduled (benchmarks/sparse_decoder.py).
LOCAL_SHARE = 32
LOCAL_CHUNK = 1 << 15


def _local_probs(query, key, allowed, base: int, scale: float) -> torch.Tensor:
    """Local window probabilities (B, nKV, g, T, w) fp32 of query (B, nKV, g, T, D) over key (.., base + T, D)."""
    length, window = query.shape[-2], allowed.shape[-1]
    scores = query.new_zeros((*query.shape[:-1], window), dtype=torch.float32)
    for o, first, keys in _window_steps(length, base, window):
        scores[..., first:, o] = _rowdot(query[..., first:, :], key[..., keys, :])
    return scores.mul_(scale).masked_fill_(~allowed, float("-inf")).softmax(dim=-1)


def _local_forward(query, key, value, allowed, base: int, scale: float):
    """Local window attention without autograd: out (B, nKV, g, T, D).

    query (B, nKV, g, T, D); key / value (B, nKV, 1, base + T, D); allowed (B, 1, 1, T, w) bool, offset
    o = the key o steps behind the query, False wherever base + i - o < 0. One pass per offset over q
    and the shifted keys: no (T, w, D) copy of the keys is ever made. The (T, w) probabilities are
    not kept: the backward recomputes them a chunk of rows at a time (the window is small).
    """
    length, window = query.shape[-2], allowed.shape[-1]
    probs = _local_probs(query, key, allowed, base, scale)
    out = torch.zeros_like(query)
    for o, first, keys in _window_steps(length, base, window):
        out[..., first:, :].addcmul_(probs[..., first:, o, None].to(value.dtype), value[..., keys, :])
    return out


def _local_backward(grad_out, query, key, value, allowed, base: int, scale: float, grads, weight=None):
    """Adds the local branch's gradients into grads = (grad_query, grad_key, grad_value).

    With `weight` (B, 1, 1, T, 1), the branch's output was `weight * out` (the gate's local share):
    the gradients include it, and the return value is d loss / d weight as (B, T). Runs over chunks
    of query rows, recomputing each chunk's probabilities, so that no (T, w) buffer is ever held:
    the peak stays at the q / k / v gradients themselves.
    """
    length, window = query.shape[-2], allowed.shape[-1]
    per_row = max(1, query[..., 0, 0].numel() * window)
    chunk = max(window, max(LOCAL_CHUNK, query.numel() // LOCAL_SHARE) // per_row)
    grad_weight = None if weight is None else query.new_zeros(query.shape[0], length, dtype=torch.float32)
    for start in range(0, length, chunk):
        end = min(length, start + chunk)
        lo = max(0, base + start - (window - 1))  # the first key this chunk's windows reach
        rows, keys = slice(start, end), slice(lo, base + end)
        part = _local_backward_rows(
            grad_out[..., rows, :],
            query[..., rows, :],
            key[..., keys, :],
            value[..., keys, :],
            allowed[..., rows, :],
            base + start - lo,
            scale,
            (grads[0][..., rows, :], grads[1][..., keys, :], grads[2][..., keys, :]),
            None if weight is None else weight[..., rows, :],
        )
        if grad_weight is not None:
            grad_weight[:, rows] = part
    return grad_weight


def _local_backward_rows(grad_out, query, key, value, allowed, base: int, scale: float, grads, weight):
    """_local_backward on one chunk of rows (views into the full tensors); probabilities recomputed."""
    grad_q, grad_k, grad_v = grads
    length, window = query.shape[-2], allowed.shape[-1]
    probs = _local_probs(query, key, allowed, base, scale)
    grad_probs = torch.zeros_like(probs)  # d loss / d probs of the unweighted output
    steps = list(_window_steps(length, base, window))
    for o, first, keys in steps:
        grad_probs[..., first:, o] = _rowdot(grad_out[..., first:, :], value[..., keys, :])
    inner = torch.einsum("...w,...w->...", probs, grad_probs)[..., None]  # <probs, grad_probs> (.., T, 1)
    grad_weight = None
    if weight is not None:  # d out / d weight = the unweighted output: <grad_out, out> per token
        grad_weight = inner.sum(dim=(1, 2))[..., 0]  # (B, T)
        grad_probs *= weight
        inner *= weight
    grad_scores = grad_probs.sub_(inner).mul_(probs).mul_(scale).to(query.dtype)  # softmax backward
    del inner

    def add_to_kv(grad: torch.Tensor, step_weight: torch.Tensor, x: torch.Tensor) -> None:
        """grad (B, nKV, 1, n, D) += step_weight * x, summed over the GQA group axis."""
        if x.shape[2] == 1:
            grad.addcmul_(step_weight, x)
        else:
            grad += _group_sum(step_weight, x)

    for o, first, keys in steps:
        p = (
            probs[..., first:, o, None]
            if weight is None
            else probs[..., first:, o, None] * weight[..., first:, :]
        )
        add_to_kv(grad_v[..., keys, :], p.to(value.dtype), grad_out[..., first:, :])
        d = grad_scores[..., first:, o, None]
        grad_q[..., first:, :].addcmul_(d, key[..., keys, :])
        add_to_kv(grad_k[..., keys, :], d, query[..., first:, :])
    return grad_weight


class LocalWindow(torch.autograd.Function):
    """The local branch alone (general path); saves its inputs only (the backward recomputes the rest)."""

    @staticmethod
    def forward(ctx, query, key, value, allowed, base: int, scale: float):
        out = _local_forward(query, key, value, allowed, base, scale)
        ctx.save_for_backward(query, key, value, allowed)
        ctx.base, ctx.scale = base, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, allowed = ctx.saved_tensors
        grads = (torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value))
        _local_backward(grad_out, query, key, value, allowed, ctx.base, ctx.scale, grads)
        return *grads, None, None, None


_flash_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


class BlockSparse(torch.autograd.Function):
    """Fast path, fused: local window + block-causal global attention + gate mix, O(T) memory.

    For one document per row starting at index 0, without cache. Query t sees the summaries of blocks
    j < a, where t + 1 = a * block + r. Put query (a, r) for a >= 1 at row a - 1 of *phase* r: row i
    then sees summaries j <= i, which is `is_causal` attention of m queries over m summaries (m = T //
    block) whose kernel skips the masked tiles. The phases are a strided view of a padded copy of one
    head's queries (batch = phase), and the kernel writes its output already in token order; one
    (batch, head) at a time, so no buffer larger than one head's is ever allocated. Saved for
    backward: the inputs, and each head's global output and log-sum-exp (what sdpa keeps too; `keep`
    False, e.g. under no_grad, keeps none). The backward runs the heads first, dropping each head's
    output as soon as its backward is done (a head whose output is gone, as in a second backward with
    retain_graph, reruns its forward kernel), rebuilds the summaries, and then recomputes the local
    probabilities a chunk of rows at a time; the local output itself is not needed (the gate's
    gradient is folded into the local backward). The key / value gradients are allocated only after
    the heads, when the kept outputs are gone, so at its peak the backward holds what sdpa's backward
    holds: the output and the q / k / v gradients.
    """

    @staticmethod
    def forward(ctx, query, key, value, gate, allowed, block: int, scale: float, keep: bool):
        # query (B, nH, T, D); key / value (B, nKV, T, D); gate (B, T, 2) probabilities (local, global)
        batch, heads, length, dim = query.shape
        kv_heads = key.shape[1]
        groups, m = heads // kv_heads, length // block
        q5, k5, v5 = query.view(batch, kv_heads, groups, length, dim), key[:, :, None], value[:, :, None]
        local = _local_forward(q5, k5, v5, allowed, 0, scale)
        mixed = local.view(batch, heads, length, dim).mul_(gate[:, None, :, 0, None].to(query.dtype))
        sum_k, sum_v = BlockSparse._summaries(key, value, block, m)
        rows = length - block + 1  # queries t = block-1 .. T-1 see at least one summary
        kept = []  # per (batch, head): the global output (block, 1, m, D) and log-sum-exp, for backward
        for b in range(batch if m else 0):
            for h in range(heads):
                phases = BlockSparse._phases(query[b, h], block, m)
                sum_kh = sum_k[b, h // groups].expand(block, 1, m, dim)
                sum_vh = sum_v[b, h // groups].expand(block, 1, m, dim)
                out, lse = _flash_forward(phases, sum_kh, sum_vh, 0.0, True, scale=scale)
                out_tokens = BlockSparse._tokens(out)[:rows]  # queries t = block-1 .. block-2+rows
                mixed[b, h, block - 1 :].addcmul_(out_tokens, gate[b, block - 1 :, 1, None].to(query.dtype))
                kept.append((out, lse) if keep else None)
                del out, lse, out_tokens
        ctx.save_for_backward(query, key, value, gate, allowed)
        ctx.block, ctx.scale, ctx.kept = block, scale, kept
        return mixed

    @staticmethod
    def _summaries(key: torch.Tensor, value: torch.Tensor, block: int, m: int):
        """Mean key / value of each of the m complete blocks: (B, nKV, m, D) each."""
        return tuple(x[:, :, : m * block].unflatten(2, (m, block)).mean(dim=3) for x in (key, value))

    @staticmethod
    def _phases(query_head: torch.Tensor, block: int, m: int) -> torch.Tensor:
        """(T, D) queries of one head -> (block, 1, m, D) phases: [r, 0, a - 1] = query a * block + r - 1."""
        length, dim = query_head.shape
        padded = F.pad(query_head, (0, 0, 1, (m + 1) * block - 1 - length))  # row u holds query u - 1
        return padded.view(m + 1, block, dim)[1:].transpose(0, 1)[:, None]

    @staticmethod
    def _tokens(phased: torch.Tensor) -> torch.Tensor:
        """(block, 1, m, D) in phase order -> (m * block, D) rows for queries t = block-1, block, ..."""
        block, _, m, dim = phased.shape
        return phased[:, 0].transpose(0, 1).reshape(m * block, dim)

    @staticmethod
    def backward(ctx, grad_mixed):
        query, key, value, gate, allowed = ctx.saved_tensors
        block, scale = ctx.block, ctx.scale
        batch, heads, length, dim = query.shape
        kv_heads = key.shape[1]
        groups, m = heads // kv_heads, length // block
        gate_q = gate.to(query.dtype)
        grad_q, grad_gate = torch.zeros_like(query), torch.zeros_like(gate)

        # Global branch first, one (batch, head) at a time: each head's kept global output and
        # log-sum-exp are dropped once used, the summaries rebuilt (a mean, cheap), and the key / value
        # gradients allocated only after the loop, so that the peak stays at dense sdpa's.
        sum_k, sum_v = BlockSparse._summaries(key, value, block, m)
        grad_sum_k, grad_sum_v = torch.zeros_like(sum_k), torch.zeros_like(sum_v)
        rows = length - block + 1
        for b, h in ((b, h) for b in range(batch if m else 0) for h in range(heads)):
            phases = BlockSparse._phases(query[b, h], block, m)
            sum_kh = sum_k[b, h // groups].expand(block, 1, m, dim)
            sum_vh = sum_v[b, h // groups].expand(block, 1, m, dim)
            saved, ctx.kept[b * heads + h] = ctx.kept[b * heads + h], None  # dropped after this head
            out, lse = saved or _flash_forward(phases, sum_kh, sum_vh, 0.0, True, scale=scale)
            grad_rows = grad_mixed[b, h, block - 1 :]  # (rows, D)
            grad_gate[b, block - 1 :, 1] += (grad_rows * BlockSparse._tokens(out)[:rows]).sum(-1)
            grad_out = grad_rows.new_zeros(m * block, dim)
            torch.mul(grad_rows, gate_q[b, block - 1 :, 1, None], out=grad_out[:rows])
            grad_out = grad_out.view(m, block, dim).transpose(0, 1)[:, None]  # phase order, like `out`
            dq, dk, dv = _flash_backward(grad_out, phases, sum_kh, sum_vh, out, lse, 0.0, True, scale=scale)
            del saved, out, lse, grad_out, phases, sum_kh, sum_vh
            grad_q[b, h, block - 1 :] += BlockSparse._tokens(dq)[:rows]
            grad_sum_k[b, h // groups] += dk.sum(dim=(0, 1))
            grad_sum_v[b, h // groups] += dv.sum(dim=(0, 1))
            del dq, dk, dv

        del sum_k, sum_v

        # a summary is the mean of its block: each member gets 1 / block of the summary's gradient.
        # grad_v's share waits in a spare row of grad_k's blocks, so that no summary gradient is
        # held next to both full key / value gradients (the peak stays at sdpa's).
        grad_k = torch.zeros_like(key)
        members_k = grad_k[:, :, : m * block].unflatten(2, (m, block))  # (B, nKV, m, block, D)
        members_k[:, :, :, 0] = grad_sum_k.div_(block)
        if block > 1:
            members_k[:, :, :, 1] = grad_sum_v.div_(block)
            del grad_sum_k, grad_sum_v
            grad_v = torch.zeros_like(value)
            grad_v[:, :, : m * block].unflatten(2, (m, block)).copy_(members_k[:, :, :, 1:2])
        else:
            grad_v = torch.zeros_like(value)
            grad_v[:, :, :m].copy_(grad_sum_v)
            del grad_sum_k, grad_sum_v
        members_k[:, :, :, 1:] = members_k[:, :, :, :1]
        del members_k

        # local branch, with the gate's local share folded in (no local output is rebuilt)
        q5 = query.view(batch, kv_heads, groups, length, dim)
        grads = (grad_q.view(q5.shape), grad_k[:, :, None], grad_v[:, :, None])
        weight = gate_q[:, None, None, :, 0, None]  # (B, 1, 1, T, 1)
        grad_gate[..., 0] = _local_backward(
            grad_mixed.reshape(q5.shape),
            q5,
            key[:, :, None],
            value[:, :, None],
            allowed,
            0,
            scale,
            grads,
            weight,
        )
        return grad_q, grad_k, grad_v, grad_gate, None, None, None, None


@dataclass
class SummaryPlan:
    """General path: the block summaries of every row, who may read them, and the chunks of query rows.

    Summaries are listed per row in order of their block's last token (`end_pos`, in T_all
    coordinates); a row with fewer than m summaries is filled up with `end_pos` = T_all (never
    visible). Query row i (token past + i) reads summary j iff its document's first token <= end_pos[j]
    <= past + i (documents are contiguous, so that is "an earlier block of the same document"). A chunk (r0, r1, s0, s1) is a run of query rows with the only summaries
    any of them can read: s0 .. s1 - 1, from the first block of row r0's document to the last block
    ended by row r1 - 1. So a chunk's scores are (r1 - r0) x (s1 - s0), never (T x m).
    """

    end_pos: torch.Tensor  # (B, m) long
    q_pos: torch.Tensor  # (T,) long: T_all index of each query
    q_start: torch.Tensor  # (B, T) long: T_all index of the first token of each query's document
    has_global: torch.Tensor  # (B, T) bool: the query sees at least one summary
    chunks: list[tuple[int, int, int, int]]

    @classmethod
    def build(cls, layout: Layout, past: int, length: int, block: int, budget: int) -> SummaryPlan | None:
        """None when no row has a complete block; `budget`: most (rows x summaries) per chunk."""
        device = layout.real.device
        total = layout.real.shape[1]
        ends = layout.real & ((layout.local_idx + 1) % block == 0)  # (B, T_all): a block closes here
        counts = ends.sum(dim=1)
        m = int(counts.max())
        if m == 0:
            return None
        index = torch.arange(total, device=device)
        order = torch.sort(ends.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :m]
        valid = torch.arange(m, device=device) < counts[:, None]  # (B, m)
        end_pos = torch.where(valid, order, total)  # ascending per row, then T_all

        # a query sees a summary iff a block of its document ended at or before it
        closed = ends.cumsum(dim=1)  # blocks closed up to and including each token
        doc_start = index - layout.local_idx  # (B, T_all) first token of each token's document
        before_doc = (closed - ends.long()).gather(1, doc_start)  # blocks closed before the document
        has_global = (closed - before_doc)[:, past:] > 0

        # per query row: the first summary of its document and one past the last it can see (both
        # non-decreasing along the row); a chunk takes the union over the batch
        q_pos = index[past:]
        q_start = doc_start[:, past:].contiguous()
        first = torch.searchsorted(end_pos, q_start).amin(dim=0).tolist()
        upto = torch.searchsorted(end_pos, q_pos.expand(len(end_pos), -1).contiguous(), right=True)
        upto = upto.amax(dim=0).tolist()
        chunks, r0 = [], 0
        while r0 < length:  # the longest run of rows from r0 whose scores fit in the budget
            lo, hi = r0 + 1, length
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if (mid - r0) * (upto[mid - 1] - first[r0]) <= budget else (lo, mid - 1)
            chunks.append((r0, lo, first[r0], upto[lo - 1]))
            r0 = lo
        return cls(end_pos, q_pos, q_start, has_global, chunks)

    def hidden(self, chunk: tuple[int, int, int, int]) -> torch.Tensor:
        """(B, 1, 1, rows, summaries) bool for one chunk: True where the query may not read the summary.

        Rows that see no summary read them all (finite values; the gate gives those rows no global share).
        """
        r0, r1, s0, s1 = chunk
        end_pos = self.end_pos[:, None, s0:s1]  # (B, 1, s)
        out = (end_pos > self.q_pos[r0:r1, None]) | (end_pos < self.q_start[:, r0:r1, None])
        out &= self.has_global[:, r0:r1, None]
        return out[:, None, None]

    def summaries(self, key: torch.Tensor, value: torch.Tensor, block: int):
        """Mean key / value of every listed block: (B, nKV, m, D) each (filler entries: finite, unread)."""
        total = key.shape[2]
        members = (self.end_pos - block + 1)[..., None] + torch.arange(block, device=key.device)
        members = members.clamp(0, total - 1).flatten(1)  # (B, m * block)
        return tuple(
            torch.stack([x[b].index_select(1, members[b]) for b in range(len(x))])
            .unflatten(2, (-1, block))
            .mean(dim=3)
            for x in (key, value)
        )


def _chunk_probs(query, sum_k, plan: SummaryPlan, chunk, scale: float):
    """One chunk's queries (B, nKV, g * rows, D) and their fp32 scores over its summaries, masked.

    query (B, nKV, g, T, D); sum_k (B, nKV, m, D). Scores: (B, nKV, g * rows, summaries).
    """
    r0, r1, s0, s1 = chunk
    batch, kv_heads, groups, _, dim = query.shape
    q = query[..., r0:r1, :].reshape(batch, kv_heads, groups * (r1 - r0), dim)
    scores = torch.matmul(q, sum_k[:, :, s0:s1].transpose(-1, -2)).float().mul_(scale)
    hidden = plan.hidden(chunk)  # (B, 1, 1, rows, summaries)
    scores.view(batch, kv_heads, groups, r1 - r0, s1 - s0).masked_fill_(hidden, float("-inf"))
    return q, scores


class GlobalChunked(torch.autograd.Function):
    """General path's global branch: block summaries read one chunk of query rows at a time.

    Any device, any layout (padding, packed documents, KV cache). Like flash attention it keeps
    only its inputs, its output and the per-row log-sum-exp for backward, and recomputes a chunk's
    probabilities there; no chunk's scores exceed `plan`'s budget, so memory is linear in T.
    """

    @staticmethod
    def forward(ctx, query, sum_k, sum_v, plan: SummaryPlan, scale: float):
        # query (B, nKV, g, T, D); sum_k / sum_v (B, nKV, m, D)
        batch, kv_heads, groups, length, dim = query.shape
        out = torch.zeros_like(query)
        lse = query.new_zeros(batch, kv_heads, groups, length, dtype=torch.float32)
        for chunk in plan.chunks:
            r0, r1, s0, s1 = chunk
            if s1 == s0:  # no summary any row of the chunk can read
                continue
            _, scores = _chunk_probs(query, sum_k, plan, chunk, scale)
            chunk_lse = scores.logsumexp(dim=-1, keepdim=True)  # (B, nKV, g * rows, 1)
            probs = scores.sub_(chunk_lse).exp_().to(query.dtype)
            part = torch.matmul(probs, sum_v[:, :, s0:s1])  # (B, nKV, g * rows, D)
            out[..., r0:r1, :] = part.view(batch, kv_heads, groups, r1 - r0, dim)
            lse[..., r0:r1] = chunk_lse.view(batch, kv_heads, groups, r1 - r0)
        ctx.save_for_backward(query, sum_k, sum_v, out, lse)
        ctx.plan, ctx.scale = plan, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, sum_k, sum_v, out, lse = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        batch, kv_heads, groups, length, dim = query.shape
        grad_q = torch.zeros_like(query)
        grad_k = torch.zeros_like(sum_k, dtype=torch.float32)
        grad_v = torch.zeros_like(sum_v, dtype=torch.float32)
        for chunk in plan.chunks:
            r0, r1, s0, s1 = chunk
            if s1 == s0:
                continue
            shape = (batch, kv_heads, groups * (r1 - r0), dim)
            q, probs = _chunk_probs(query, sum_k, plan, chunk, scale)
            probs = probs.sub_(lse[..., r0:r1].reshape(*shape[:3], 1)).exp_()  # (B, nKV, g * rows, s)
            grad = grad_out[..., r0:r1, :].reshape(shape)
            inner = (grad.float() * out[..., r0:r1, :].reshape(shape).float()).sum(-1, keepdim=True)
            grad_v[:, :, s0:s1] += torch.matmul(probs.mT, grad.float())
            grad_s = torch.matmul(grad, sum_v[:, :, s0:s1].mT).float()  # d loss / d probs
            grad_s = grad_s.sub_(inner).mul_(probs).mul_(scale)  # softmax backward, then the scale
            del probs
            part = torch.matmul(grad_s.to(query.dtype), sum_k[:, :, s0:s1])
            grad_q[..., r0:r1, :] = part.view(batch, kv_heads, groups, r1 - r0, dim)
            grad_k[:, :, s0:s1] += torch.matmul(grad_s.mT, q.float())
        return grad_q, grad_k.to(sum_k.dtype), grad_v.to(sum_v.dtype), None, None
