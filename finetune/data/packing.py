"""Packing: many short examples into rows of at most `max_length` tokens, no padding wasted.

Each row keeps `position_ids` that restart at 0 for every document, so a packed row is equivalent to
its documents run one by one: transformers' masking builds a block-diagonal causal mask from
position ids when no attention mask is given (what `finetune.data.collate.PackedCollator` sends),
and the first label of every document is -100, so no token is trained to predict across a boundary.

Greedy and in order (deterministic). Text documents longer than the room left are split: the first
part fills the row, the rest continues in the next (its positions restart at 0). Instruction and chat
examples are never split (they are truncated to max_length before, and reported).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from finetune.data.formats import IGNORE_INDEX


@dataclass
class Packer:
    """Accumulates examples into rows; call `add` per example, then `finish` once."""

    max_length: int
    split_long: bool
    rows: list[dict[str, list[int]]] = field(default_factory=list)
    split_documents: int = 0
    _ids: list[int] = field(default_factory=list)
    _labels: list[int] = field(default_factory=list)
    _positions: list[int] = field(default_factory=list)

    def add(self, ids: list[int], labels: list[int]) -> None:
        if not self.split_long and len(self._ids) + len(ids) > self.max_length:
            self._close_row()
        was_split = False
        while ids:
            room = self.max_length - len(self._ids)
            piece_ids, piece_labels = ids[:room], labels[:room]
            ids, labels = ids[room:], labels[room:]
            was_split = was_split or bool(ids)
            self._ids += piece_ids
            self._labels += [IGNORE_INDEX] + piece_labels[1:]  # never predict a document from the one before
            self._positions += list(range(len(piece_ids)))
            if len(self._ids) >= self.max_length:
                self._close_row()
        self.split_documents += was_split

    def _close_row(self) -> None:
        if self._ids:
            self.rows.append(
                {"input_ids": self._ids, "labels": self._labels, "position_ids": self._positions}
            )
        self._ids, self._labels, self._positions = [], [], []

    def finish(self) -> list[dict[str, list[int]]]:
        self._close_row()
        return self.rows
