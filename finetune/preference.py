"""`train.method` dpo / orpo / simpo: the `train.preference` settings, checked, and the held-out metrics.

    train:
      method: dpo                 # sft (default) | dpo | orpo | simpo
      preference: {beta: 0.1, loss_type: sigmoid, label_smoothing: 0.0}

The losses themselves are in finetune/losses.py (the one loop calls them); the data format
(`data.format: preference`) in finetune/data/preference.py. Keys that do not apply to the chosen
method are refused, not ignored. Defaults are the papers' and TRL's: DPO beta 0.1; ORPO lambda 0.1;
SimPO beta 2.0 (the paper's range 2.0-2.5; TRL's CPOConfig default 0.1 is the CPO one) and gamma 0.5.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

import torch

from finetune.losses import PREFERENCE_METRICS, PairLogps, PreferenceObjective

METHODS = ("dpo", "orpo", "simpo")
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")
# method -> the train.preference keys it reads, with their defaults
KEYS: dict[str, dict[str, Any]] = {
    "dpo": {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0},
    "orpo": {"lambda": 0.1},
    "simpo": {"beta": 2.0, "gamma": 0.5, "label_smoothing": 0.0},
}


def preference_problems(method: str, settings: dict[str, Any] | None, data_format: str | None) -> list[str]:
    """What is wrong with `train.method` / `train.preference` / `data.format` together, one fix each."""
    problems = []
    if method == "sft":
        if settings is not None:
            problems.append(
                "train.preference is set but train.method is sft; set train.method: dpo, orpo or simpo"
            )
        if data_format == "preference":
            problems.append(
                "data.format is preference but train.method is sft; set train.method: dpo, orpo or simpo"
            )
        return problems
    if data_format not in (None, "preference"):
        problems.append(
            f"train.method {method} needs data.format: preference (prompt / chosen / rejected records), "
            f"not {data_format}"
        )
    known = KEYS[method]
    for key, value in (settings or {}).items():
        if key not in known:
            other = [m for m in METHODS if key in KEYS[m]]
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = (
                f"it belongs to train.method {other[0]}"
                if other
                else (f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}")
            )
            problems.append(f"train.preference.{key} does not apply to train.method {method}; {hint}")
            continue
        if key == "loss_type":
            if value not in DPO_LOSS_TYPES:
                problems.append(
                    f"train.preference.loss_type {value!r} is not one of {', '.join(DPO_LOSS_TYPES)}"
                )
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            problems.append(f"train.preference.{key} must be a number, got {value!r}")
        elif key in ("beta", "lambda") and value <= 0:
            problems.append(f"train.preference.{key} must be > 0, got {value}")
        elif key == "label_smoothing" and not 0 <= value < 0.5:
            problems.append(f"train.preference.label_smoothing must be in [0, 0.5), got {value}")
    return problems


def make_objective(method: str, settings: dict[str, Any] | None) -> PreferenceObjective | None:
    """The objective of a checked `train.method` / `train.preference` (None for sft)."""
    if method == "sft":
        return None
    values = {**KEYS[method], **(settings or {})}
    return PreferenceObjective(
        method=method,
        beta=float(values.get("beta", 0.0)),
        loss_type=values.get("loss_type", "sigmoid"),
        label_smoothing=float(values.get("label_smoothing", 0.0)),
        lam=float(values.get("lambda", 0.0)),
        gamma=float(values.get("gamma", 0.0)),
    )


def chosen_half(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The chosen rows of a preference batch: an SFT batch (loss on the chosen completions only)."""
    rows = batch["input_ids"].shape[0] // 2
    return {k: v[:rows] for k, v in batch.items()}


@torch.no_grad()
def evaluate_preference(
    acc: Any, model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], objective: PreferenceObjective
) -> dict[str, float]:
    """Held-out preference loss and reward metrics (means over all pairs of all processes): `loss`
    and `PREFERENCE_METRICS`. Each process takes its share of `batches`."""
    mine = batches[acc.process_index :: acc.num_processes]
    rounds = math.ceil(len(batches) / acc.num_processes)
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(PREFERENCE_METRICS) + 2, device=acc.device)  # loss, metrics..., pairs
    for batch in mine:
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        policy = PairLogps.of(model(**batch, use_cache=False).logits, labels)
        reference = objective.reference_logps(batch, labels) if objective.needs_reference else None
        losses, chosen, rejected = objective.losses(policy, reference)
        sums += torch.stack(
            [
                losses.sum(),
                chosen.sum(),
                rejected.sum(),
                (chosen > rejected).float().sum(),
                (chosen - rejected).sum(),
                torch.tensor(float(len(losses)), device=acc.device),
            ]
        )
    if len(mine) < rounds:  # sharded models need every process in every forward: one discarded extra
        extra = {k: v.to(acc.device) for k, v in batches[0].items() if k != "labels"}
        model(**extra, use_cache=False)
        if objective.needs_reference:
            objective.reference_logps(extra, batches[0]["labels"].to(acc.device))
    model.train(was_training)
    sums = acc.reduce(sums, "sum")
    means = (sums[:-1] / sums[-1].clamp(min=1)).tolist()
    return dict(zip(("loss", *PREFERENCE_METRICS), means))
