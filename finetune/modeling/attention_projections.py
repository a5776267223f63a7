"""The q/k/v/o projections and rotary step shared by the dense and the hierarchical sparse attention.

Both attention kinds take the same inputs to their attention proper; keeping the projection code in
one place keeps their parameter names (what LoRA targets and checkpoints store) and shapes identical.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.models.qwen3_moe.modeling_qwen3_moe import apply_rotary_pos_emb


def add_qkvo_projections(module: nn.Module, config) -> None:
    """Give `module` q_proj / k_proj / v_proj / o_proj for config's heads (GQA when kv < heads)."""
    hidden, head_dim, bias = config.hidden_size, config.head_dim, config.attention_bias
    module.q_proj = nn.Linear(hidden, config.num_attention_heads * head_dim, bias=bias)
    module.k_proj = nn.Linear(hidden, config.num_key_value_heads * head_dim, bias=bias)
    module.v_proj = nn.Linear(hidden, config.num_key_value_heads * head_dim, bias=bias)
    module.o_proj = nn.Linear(config.num_attention_heads * head_dim, hidden, bias=bias)


def project_qkv(
    module: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    cache: Cache | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries (B, nH, T, D) and the keys / values so far (B, nKV, T_all, D), rotary applied, cache updated."""
    hidden_shape = (*hidden_states.shape[:-1], -1, module.head_dim)
    query = module.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, nH, T, D)
    key = module.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, nKV, T, D)
    value = module.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    if cache is not None:
        key, value = cache.update(key, value, module.layer_idx)  # (B, nKV, T_all, D)
    return query, key, value
