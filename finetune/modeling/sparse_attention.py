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

Cost. The global branch is computed with the block-causal structure, never an n x n matrix: query t
sees blocks j < (t + 1) // block_size, so after grouping the queries by their phase r = (t + 1) %
block_size, every phase is a plain *causal* attention of n / block_size queries over n / block_size
summaries. All phases go through one `scaled_dot_product_attention(is_causal=True)` call (phases are
folded into the head axis and share the summaries as GQA groups), whose kernel skips the masked blocks
and keeps memory O(n). Padded, packed or cached inputs take an exact general path with an explicit
block mask of shape (queries x summaries). The local branch works on chunks of `_LOCAL_CHUNK` queries
against their chunk plus the `local_window - 1` keys before it: memory and time linear in n.

Padding and packing: `padding_mask` (1 = real token) and `position_ids` restarting at 0 mark the
documents; tokens never attend across documents or to padding, and blocks are counted from each
document's first real token, so a left-padded or packed document gives the same outputs as alone.
With a KV cache the branch recomputes the summaries from the cached keys, so decoding token by token
gives the full forward's result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache
from transformers.models.qwen3_moe.modeling_qwen3_moe import apply_rotary_pos_emb

_LOCAL_CHUNK = 16  # queries per local-attention chunk; each chunk reads its own keys + local_window - 1


@dataclass
class _Layout:
    """Where the documents are, for every cached + current token of each row (B, T_all)."""

    real: torch.Tensor  # bool: a real token (not padding)
    doc: torch.Tensor  # long: document index (increases along the row)
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
    ) -> _Layout:
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
        return cls(real=real, doc=start.cumsum(dim=1), local_idx=local_idx, regular=regular)


class HierarchicalSparseAttention(nn.Module):
    """Local window + block-summary global attention mixed by a learned per-token gate (GQA)."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        if config.local_window < 1:
            raise ValueError(f"local_window={config.local_window}; it must be at least 1 token")
        if not 0 < config.global_ratio <= 1:
            raise ValueError(f"global_ratio={config.global_ratio}; it must be in (0, 1], e.g. 0.1")
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.local_window = config.local_window
        self.block_size = max(1, round(1 / config.global_ratio))
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
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
        hidden_shape = (batch, length, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, nH, T, D)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, nKV, T, D)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)  # (B, nKV, T_all, D)
        total = key.shape[2]
        past = total - length
        layout = _Layout.build(padding_mask, position_ids, batch, past, total, hidden_states.device)
        dropout = self.config.attention_dropout if self.training else 0.0

        local = self._local(query, key, value, layout, past, dropout)  # (B, nH, T, D)
        if layout.regular:
            glob, has_global = self._global_block_causal(query, key, value, dropout)
        else:
            glob, has_global = self._global_masked(query, key, value, layout, past, dropout)

        gate_logits = self.mix_gate(hidden_states).float()  # (B, T, 2)
        no_global = torch.stack([torch.zeros_like(has_global), ~has_global], dim=-1)
        gate = gate_logits.masked_fill(no_global, float("-inf")).softmax(dim=-1).to(query.dtype)
        mixed = local * gate[:, None, :, 0, None]  # (B, nH, T, D)
        if glob is not None:
            mixed = mixed + glob * gate[:, None, :, 1, None]
        attn_output = mixed.transpose(1, 2).reshape(batch, length, -1)
        return self.o_proj(attn_output), None

    # ------------------------------------------------------------------------------ local branch

    def _local(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        layout: _Layout,
        past: int,
        dropout: float,
    ) -> torch.Tensor:
        """Each query attends to offsets 0 .. window-1 behind it, inside its document, real keys only."""
        batch, heads, length, dim = query.shape
        kv_heads, window = key.shape[1], self.local_window
        chunk = min(_LOCAL_CHUNK, length)
        n_chunks = -(-length // chunk)
        padded = n_chunks * chunk
        span = chunk + window - 1  # keys one chunk of queries can reach
        # Keys from `window - 1` before the first query to the last query, front-padded where the
        # sequence starts later, end-padded to whole chunks: kp[i + window - 1 - o] is query i's offset o.
        lo = max(0, past - (window - 1))
        front = window - 1 - (past - lo)
        keys = F.pad(key[:, :, lo:], (0, 0, front, padded - length))  # (B, nKV, window-1+padded, D)
        values = F.pad(value[:, :, lo:], (0, 0, front, padded - length))
        keys = keys.unfold(2, span, chunk)  # (B, nKV, n_chunks, D, span), overlapping view
        values = values.unfold(2, span, chunk)

        real = F.pad(layout.real[:, lo:], (front, padded - length), value=False).unfold(1, span, chunk)
        local_idx = F.pad(layout.local_idx[:, past:], (0, padded - length)).view(batch, n_chunks, chunk, 1)
        i = torch.arange(chunk, device=query.device)[:, None]
        j = torch.arange(span, device=query.device)[None, :]
        offset = i + window - 1 - j  # (chunk, span): how far key j lies behind query i
        in_window = (offset >= 0) & (offset < window)
        allowed = in_window & ((offset == 0) | ((offset <= local_idx) & real[:, :, None, :]))
        allowed = allowed[:, None, None]  # (B, 1, 1, n_chunks, chunk, span)

        groups = heads // kv_heads
        q = F.pad(query, (0, 0, 0, padded - length)).view(batch, kv_heads, groups, n_chunks, chunk, dim)
        scores = torch.einsum("bkgncd,bkndj->bkgncj", q, keys) * self.scaling
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        probs = F.dropout(probs, p=dropout, training=dropout > 0)
        out = torch.einsum("bkgncj,bkndj->bkgncd", probs, values)  # (B, nKV, g, n_chunks, chunk, D)
        return out.reshape(batch, heads, padded, dim)[:, :, :length]

    # ----------------------------------------------------------------------------- global branch

    def _global_block_causal(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Fast path (one document per row from index 0, no cache): phases fold into causal sdpa.

        With u = t + 1 = a * block + r, query t sees the summaries j < a. Put query (a, r) for a >= 1
        at row a - 1 of phase r: row i sees j <= i, which is exactly `is_causal` on an m x m problem.
        """
        batch, heads, length, dim = query.shape
        block = self.block_size
        m = length // block  # complete blocks = summaries = rows per phase
        has_global = (torch.arange(length, device=query.device) >= block - 1).expand(batch, length)
        if m == 0:
            return None, has_global
        kv_heads = key.shape[1]
        sum_k = key[:, :, : m * block].reshape(batch, kv_heads, m, block, dim).mean(dim=3)  # (B, nKV, m, D)
        sum_v = value[:, :, : m * block].reshape(batch, kv_heads, m, block, dim).mean(dim=3)
        # Row u of q holds query t = u - 1; rows u = 0 .. block - 1 (a = 0) see no summary: dropped.
        q = F.pad(query, (0, 0, 1, (m + 1) * block - 1 - length))  # (B, nH, (m+1)*block, D)
        q = q.view(batch, heads, m + 1, block, dim)[:, :, 1:]  # (B, nH, m, block, D): [a - 1, r]
        q = q.transpose(2, 3).reshape(batch, heads * block, m, dim)  # head-major, then phase
        out = F.scaled_dot_product_attention(
            q, sum_k, sum_v, dropout_p=dropout, is_causal=True, scale=self.scaling, enable_gqa=True
        )  # (B, nH*block, m, D); query head h*block + r reads kv head h // (nH / nKV)
        out = out.view(batch, heads, block, m, dim).transpose(2, 3).reshape(batch, heads, m * block, dim)
        out = F.pad(out, (0, 0, block - 1, 0))[:, :, :length]  # back to t = 0 .. T-1
        return out, has_global

    def _global_masked(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        layout: _Layout,
        past: int,
        dropout: float,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """General path (padding, packed documents, KV cache): summaries at each block's last token."""
        batch, heads, length, dim = query.shape
        block = self.block_size
        ends = layout.real & ((layout.local_idx + 1) % block == 0)  # (B, T_all): a block closes here
        counts = ends.sum(dim=1)
        m = int(counts.max())
        if m == 0:
            return None, torch.zeros(batch, length, dtype=torch.bool, device=query.device)
        end_pos = torch.sort(ends.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :m]
        valid = torch.arange(m, device=query.device) < counts[:, None]  # (B, m)
        members = (end_pos - block + 1).clamp(min=0)[..., None] + torch.arange(block, device=query.device)
        members = members.clamp(max=key.shape[2] - 1).view(batch, 1, m * block, 1)
        members = members.expand(batch, key.shape[1], m * block, dim)
        sum_k = key.gather(2, members).view(batch, -1, m, block, dim).mean(dim=3)  # (B, nKV, m, D)
        sum_v = value.gather(2, members).view(batch, -1, m, block, dim).mean(dim=3)

        q_pos = torch.arange(past, past + length, device=query.device)
        q_doc = layout.doc[:, past:]  # (B, T)
        visible = (end_pos[:, None, :] <= q_pos[None, :, None]) & valid[:, None, :]
        visible &= layout.doc.gather(1, end_pos)[:, None, :] == q_doc[:, :, None]  # (B, T, m)
        has_global = visible.any(dim=-1)
        visible |= ~has_global[..., None]  # rows without a summary read all (finite); the gate drops them
        out = F.scaled_dot_product_attention(
            query, sum_k, sum_v, attn_mask=visible[:, None], dropout_p=dropout, scale=self.scaling,
            enable_gqa=True,
        )  # fmt: skip
        return out, has_global
