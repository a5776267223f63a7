"""Hierarchical sparse attention (placeholder until its issue lands): local window + global tokens + gate."""

from __future__ import annotations

from torch import nn


class HierarchicalSparseAttention(nn.Module):
    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        raise NotImplementedError("hierarchical_sparse attention is not implemented yet")
