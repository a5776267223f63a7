"""Batching: dynamic padding (with attention masks) or packed rows (with restarting position ids),
and length bucketing through a sampler.

Padding goes on the right with the tokenizer's pad id (EOS, then 0, when it has none: padded positions
are masked and their labels are -100, so the id never matters).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from finetune.data.formats import IGNORE_INDEX, text_tokenizer


def pad_id_of(tokenizer: Any) -> int:
    tok = text_tokenizer(tokenizer)
    for candidate in (tok.pad_token_id, tok.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _padded(rows: Sequence[Sequence[int]], width: int, fill: int) -> torch.Tensor:
    """Right-pad `rows` to `width` with `fill`: (B, T) long."""
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


class PaddingCollator:
    """Examples of different lengths -> `input_ids`, `attention_mask`, `labels` (B, T), padded to the
    longest example of the batch (rounded up to `pad_to_multiple_of`)."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def width(self, features: Sequence[dict[str, Any]]) -> int:
        longest = max(len(f["input_ids"]) for f in features)
        multiple = self.pad_to_multiple_of
        return -(-longest // multiple) * multiple if multiple else longest

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = self.width(features)
        return {
            "input_ids": _padded([f["input_ids"] for f in features], width, self.pad_id),
            "attention_mask": _padded([[1] * len(f["input_ids"]) for f in features], width, 0),
            "labels": _padded([f["labels"] for f in features], width, IGNORE_INDEX),
        }


class PackedCollator(PaddingCollator):
    """Packed rows -> `input_ids`, `labels`, `position_ids` (B, T) and no attention mask: transformers
    derives the block-diagonal causal mask from position ids that restart at every document. Padding
    at the end of a short row is one more (ignored) document: its positions restart at 0 too."""

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = self.width(features)
        positions = [list(f["position_ids"]) + list(range(width - len(f["position_ids"]))) for f in features]
        return {
            "input_ids": _padded([f["input_ids"] for f in features], width, self.pad_id),
            "labels": _padded([f["labels"] for f in features], width, IGNORE_INDEX),
            "position_ids": _padded(positions, width, 0),
        }


def length_grouped_sampler(lengths: Sequence[int], batch_size: int, seed: int) -> torch.utils.data.Sampler:
    """Length bucketing: a seeded random order in which each run of `batch_size` indices has similar
    lengths (transformers' LengthGroupedSampler: shuffle, cut into mega-batches, sort each by length)."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    generator = torch.Generator().manual_seed(seed)
    return LengthGroupedSampler(batch_size, lengths=list(lengths), generator=generator)
