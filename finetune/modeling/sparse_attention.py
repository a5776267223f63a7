"""Hierarchical sparse attention: a causal local window + global block summaries, mixed by a learned gate.

Per token t and head, two attention branches over the same (rotary) keys and values:

- **local**: softmax attention over the last `local_window` tokens of t's document (t included);
- **global**: softmax attention over *block summaries*. The sequence of each document is cut into
  blocks of `block_size = round(1 / global_ratio)` tokens (10 by default, so the summaries are 10% of
  the sequence); a block's summary key / value is the mean of its keys / values. Token t sees the
  summary of a block only once the whole block lies at or before t (block j ends at token
  (j + 1) * block_size - 1), so a summary never contains a later token: causal at block level.

The two outputs are mixed per token by `softmax(mix_gate(x))`, `mix_gate = Linear(hidden, 2)`, then
projected by `o_proj`. Tokens that see no complete block yet (the first block_size - 1 of a document)
use the local branch alone.

Why these global tokens. Longformer (Beltagy et al., 2020) and BigBird (Zaheer et al., 2020) showed
that a sliding window plus a few global tokens keeps most of full attention's quality at linear cost;
their global tokens are fixed positions chosen per task (CLS, question tokens), which a general causal
LM does not have. DeepSeek's Native Sparse Attention (Yuan et al., 2025) makes the global part
*compressed* blocks (pooled keys / values of consecutive blocks) next to a sliding window and mixes the
branches with a learned per-token gate; it is trainable end to end and causal at block granularity.
We take NSA's compression and sliding-window branches with its gate and leave out its third branch
(top-k selected blocks), whose gathers are slow on a CPU. Pooling is a plain mean of the post-rotary
keys: it adds no parameters (so LoRA on q/k/v/o_proj and mix_gate reaches every learned weight), it
keeps relative positions exact (a summary is the block as seen from the query's frame), and over a
10-token block only the few fastest rotary frequencies average out.

Cost. Nothing here forms an n x n matrix. Query t sees the blocks j < (t + 1) // block_size; grouping
the queries by their phase r = (t + 1) % block_size makes every phase a plain *causal* attention of
n / block_size queries over the n / block_size summaries. On a CPU the fast path (one document per row,
no cache) runs exactly that through the causal flash-attention kernel, whose tiles above the diagonal
are skipped, so the global work is about n^2 / (2 * block_size) instead of dense attention's n^2 / 2,
in O(n) memory; it is fused with the local branch and the gate in one autograd Function that keeps
its inputs and, as sdpa does, each head's global output and log-sum-exp for backward, and recomputes
the local window's probabilities there a few chunks of rows at a time (peak memory of the attention
within a few percent of dense sdpa's, see benchmarks/sparse_attention.py). Left-padded, packed or cached inputs, and every other device, take
the exact general path: the same summaries, read a chunk of query rows at a time, each chunk against
only the summaries its rows can see (from the first block of its first row's document to the last
block its last row has closed), with the block mask built per chunk; a chunk's scores are never larger
than the queries (T x D per head), and the backward recomputes them from the output and the log-sum-exp like
flash attention. So the general path is linear in n in memory too, and on a single document it skips
the summaries above the diagonal a chunk at a time. The local branch is one pass over q and the
shifted keys per window offset (a batched matmul over views, no (n, window, D) copy): time and memory
linear in n.

Padding and packing: `padding_mask` (1 = real token) and `position_ids` restarting at 0 mark the
documents; tokens never attend across documents or to padding, and blocks are counted from each
document's first real token, so a left-padded or packed document gives the same outputs as alone.
With a KV cache the branch recomputes the summaries from the cached keys, so decoding token by token
gives the full forward's result.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache

from .attention_projections import add_qkvo_projections, project_qkv
from .sparse_attention_kernels import BlockSparse, GlobalChunked, Layout, LocalWindow, SummaryPlan

_GLOBAL_CHUNK = 0  # (query rows x summaries) per head in one chunk of the general path; 0: T x head_dim


class HierarchicalSparseAttention(nn.Module):
    """Local window + block-summary global attention mixed by a learned per-token gate (GQA)."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        if config.local_window < 1:
            raise ValueError(f"local_window={config.local_window}; it must be at least 1 token")
        if not 0 < config.global_ratio <= 1:
            raise ValueError(f"global_ratio={config.global_ratio}; it must be in (0, 1], e.g. 0.1")
        if config.attention_dropout:
            raise ValueError(
                "hierarchical_sparse attention has no attention dropout; set attention_dropout=0"
            )
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.local_window = config.local_window
        self.block_size = max(1, round(1 / config.global_ratio))
        add_qkvo_projections(self, config)
        self.mix_gate = nn.Linear(config.hidden_size, 2)  # per-token logits of (local, global)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        position_ids: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        # `attention_mask` (the dense 4D causal mask) is not used: the document layout comes from
        # `padding_mask` and `position_ids`, and this module builds its own sparse masks.
        batch, length, _ = hidden_states.shape
        query, key, value = project_qkv(self, hidden_states, position_embeddings, cache)
        past = key.shape[2] - length
        layout = Layout.build(padding_mask, position_ids, batch, past, key.shape[2], hidden_states.device)
        mixed = self.attend(query, key, value, self.mix_gate(hidden_states), layout)  # (B, nH, T, D)
        attn_output = mixed.transpose(1, 2).reshape(batch, length, -1)
        return self.o_proj(attn_output), None

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        gate_logits: torch.Tensor,
        layout: Layout,
    ) -> torch.Tensor:
        """The attention proper: (B, nH, T, D) queries over (B, nKV, T_all, D) keys -> (B, nH, T, D).

        The last T of the T_all keys belong to the queries; `gate_logits` (B, T, 2) are the mix_gate's.
        """
        batch, heads, length, dim = query.shape
        past = key.shape[2] - length
        lo = max(0, past - (self.local_window - 1))  # the first key any query's window reaches
        allowed = self._window_mask(layout, past, lo, length)[:, None, None]  # (B, 1, 1, T, w)
        if layout.regular and query.device.type == "cpu":  # fused fast path (a CPU kernel)
            has_global = torch.arange(length, device=query.device) >= self.block_size - 1  # a block done
            gate = self._gate(gate_logits, has_global.expand(batch, length))
            keep = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, gate))
            return BlockSparse.apply(query, key, value, gate, allowed, self.block_size, self.scaling, keep)

        q5 = query.view(batch, key.shape[1], -1, length, dim)  # (B, nKV, g, T, D)
        k5, v5 = key[:, :, None, lo:], value[:, :, None, lo:]  # (B, nKV, 1, past - lo + T, D)
        local = LocalWindow.apply(q5, k5, v5, allowed, past - lo, self.scaling).view_as(query)
        budget = _GLOBAL_CHUNK or length * dim  # a chunk's scores: no larger than the queries (T x D)
        plan = SummaryPlan.build(layout, past, length, self.block_size, budget)
        if plan is None:  # no token sees a complete block: the local branch alone
            return local
        sum_k, sum_v = plan.summaries(key, value, self.block_size)
        glob = GlobalChunked.apply(q5, sum_k, sum_v, plan, self.scaling).view_as(query)
        gate = self._gate(gate_logits, plan.has_global).to(query.dtype)
        return local * gate[:, None, :, 0, None] + glob * gate[:, None, :, 1, None]

    @staticmethod
    def _gate(gate_logits: torch.Tensor, has_global: torch.Tensor) -> torch.Tensor:
        """Per-token mix (B, T, 2) in fp32; tokens that see no summary yet take the local branch alone."""
        no_global = torch.stack([torch.zeros_like(has_global), ~has_global], dim=-1)
        return gate_logits.float().masked_fill(no_global, float("-inf")).softmax(dim=-1)

    def _window_mask(self, layout: Layout, past: int, lo: int, length: int) -> torch.Tensor:
        """(B, T, w) bool: may query i see the key o steps behind it (same document, a real token)?"""
        window, device = self.local_window, layout.real.device
        offset = torch.arange(window, device=device)
        key_pos = torch.arange(past - lo, past - lo + length, device=device)[:, None] - offset  # from lo
        batch = layout.real.shape[0]
        real = layout.real[:, lo:].gather(1, key_pos.clamp(min=0).flatten()[None].expand(batch, -1))
        allowed = (offset <= layout.local_idx[:, past:, None]) & real.view(batch, length, window)
        return allowed | (offset == 0)  # a token always sees itself (padding too: no empty row)
