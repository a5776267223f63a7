"""The `synthetic:KIND[:N[:SEED]]` source form shared by the text and the multimodal generators."""

from __future__ import annotations

from collections.abc import Iterable


def parse_synthetic_spec(spec: str, kinds: Iterable[str]) -> tuple[str, int | None, int | None]:
    """`synthetic:KIND[:N[:SEED]]` -> (KIND, N or None, SEED or None); a ValueError says the form."""
    kinds = tuple(kinds)
    parts = spec.split(":")
    if parts[0] != "synthetic" or len(parts) not in (2, 3, 4) or parts[1] not in kinds:
        raise ValueError(f"'{spec}': write synthetic:KIND[:N[:SEED]] with KIND one of {', '.join(kinds)}")
    numbers = parts[2:]
    if not all(x.isdigit() for x in numbers) or (numbers and int(numbers[0]) < 1):
        raise ValueError(f"'{spec}': N must be a positive integer and SEED a non-negative integer")
    return parts[1], int(numbers[0]) if numbers else None, int(numbers[1]) if len(numbers) > 1 else None
