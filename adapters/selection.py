"""ESFT-style expert selection: per layer, the experts that carry most of the domain's routing.

ESFT (Wang et al., 2024, "Let the Expert Stick to His Last") scores each expert of a layer on the
domain data (average gate score, or token selection ratio) and keeps, in order of score, the
experts whose cumulative share of the layer's total score first reaches a threshold p.
The statistics come from `finetune.evaluate.profile_experts`; this module is the pure algorithm
plus the reader of `selection.json`, so `apply_lora(experts=...)` can take either.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from adapters.errors import MoetuneError

METRICS = ("token_ratio", "gate_score")


def select_experts(scores: Mapping[int, Sequence[float]], threshold: float = 0.2) -> dict[int, list[int]]:
    """Per layer, experts by descending score until their cumulative share reaches `threshold`.

    scores: layer -> one non-negative score per expert. The shares are normalised per layer, so
    token ratios (summing to top_k) and gate scores can be passed as they are. At least one expert
    is kept per layer that has any score; ties keep the lower expert id first.
    """
    if not 0.0 < threshold <= 1.0:
        raise MoetuneError(f"expert selection threshold {threshold} must be in (0, 1]; ESFT uses 0.1-0.3")
    selection: dict[int, list[int]] = {}
    for layer, layer_scores in sorted(scores.items()):
        values = [float(v) for v in layer_scores]
        total = sum(values)
        if total <= 0:
            selection[int(layer)] = []
            continue
        order = sorted(range(len(values)), key=lambda e: (-values[e], e))
        chosen, cumulative = [], 0.0
        for expert in order:
            chosen.append(expert)
            cumulative += values[expert] / total
            if cumulative >= threshold - 1e-12:
                break
        selection[int(layer)] = sorted(chosen)
    return selection


def load_selection(experts) -> dict[int, list[int]]:
    """A selection mapping {layer: [expert ids]} or a path to selection.json -> {int: sorted ids}.

    selection.json is what `moetune experts profile` writes: {"layers": {"3": [1, 7], ...}, ...};
    a bare {"3": [1, 7]} mapping is accepted too.
    """
    source = "adapter.experts"
    if isinstance(experts, (str, Path)):
        path = Path(experts)
        source = str(path)
        if not path.is_file():
            raise MoetuneError(
                f"{path}: expert selection file not found; run `moetune experts profile` first"
            )
        try:
            experts = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise MoetuneError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if isinstance(experts, dict) and "layers" in experts:
            experts = experts["layers"]
    if not isinstance(experts, Mapping):
        raise MoetuneError(
            f"{source}: expected a mapping layer -> list of expert ids, got {type(experts).__name__}"
        )
    selection: dict[int, list[int]] = {}
    for layer, ids in experts.items():
        try:
            layer_index = int(layer)
            chosen = sorted({int(e) for e in ids})
        except (TypeError, ValueError):
            raise MoetuneError(
                f"{source}: layer {layer!r} -> {ids!r} is not 'layer index -> list of expert ids'"
            ) from None
        if any(e < 0 for e in chosen) or layer_index < 0:
            raise MoetuneError(f"{source}: negative layer or expert id in layer {layer!r}")
        selection[layer_index] = chosen
    return selection
