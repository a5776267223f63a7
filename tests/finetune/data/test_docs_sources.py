"""docs/recipes-and-data.md documents the `synthetic:` data source as the code implements it."""

from __future__ import annotations

from pathlib import Path

from finetune.data.synthetic_mm import DEFAULT_SEEDS, DEFAULT_SIZES, KINDS, parse_spec

DOC = Path(__file__).resolve().parents[3] / "docs" / "recipes-and-data.md"


def test_the_synthetic_source_row_names_every_kind_and_the_defaults():
    (row,) = [
        line for line in DOC.read_text().splitlines() if line.startswith("| `synthetic:KIND[:N[:SEED]]`")
    ]
    for kind in KINDS:
        assert f"`{kind}`" in row, kind
    assert f"N = {DEFAULT_SIZES['train']} for `data.train`, {DEFAULT_SIZES['eval']} for `data.eval`" in row
    assert f"SEED {DEFAULT_SEEDS['train']} for train and {DEFAULT_SEEDS['eval']} for eval" in row
    assert parse_spec("synthetic:shapes-caption:16:3") == (
        "shapes-caption",
        16,
        3,
    )  # the syntax the row shows
