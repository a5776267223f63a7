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


def _padded_length(lengths: Sequence[int], multiple: int | None) -> int:
    longest = max(lengths)
    if multiple:
        longest = -(-longest // multiple) * multiple
    return longest


class PaddingCollator:
    """Examples of different lengths -> `input_ids`, `attention_mask`, `labels` (B, T), padded to the
    longest example of the batch (rounded up to `pad_to_multiple_of`)."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        width = _padded_length(lengths, self.pad_to_multiple_of)
        input_ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, (f, n) in enumerate(zip(features, lengths)):
            input_ids[row, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class PackedCollator:
    """Packed rows -> `input_ids`, `labels`, `position_ids` (B, T) and no attention mask: transformers
    derives the block-diagonal causal mask from position ids that restart at every document. Padding
    at the end of a short row is one more (ignored) document: its positions restart at 0 too."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        width = _padded_length(lengths, self.pad_to_multiple_of)
        input_ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(features), width), dtype=torch.long)
        for row, (f, n) in enumerate(zip(features, lengths)):
            input_ids[row, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
            position_ids[row, :n] = torch.as_tensor(f["position_ids"], dtype=torch.long)
            position_ids[row, n:] = torch.arange(width - n)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def length_grouped_sampler(lengths: Sequence[int], batch_size: int, seed: int) -> torch.utils.data.Sampler:
    """Length bucketing: a seeded random order in which each run of `batch_size` indices has similar
    lengths (transformers' LengthGroupedSampler: shuffle, cut into mega-batches, sort each by length)."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    generator = torch.Generator().manual_seed(seed)
    return LengthGroupedSampler(batch_size, lengths=list(lengths), generator=generator)
