"""ESFT in one recipe: `adapter.experts: {threshold: P}` profiles the loaded model and selects in the run.

Before LoRA is attached, the base model's routing is measured on `adapter.experts.data` (default: the
training examples themselves, as the run tokenized them) with `finetune.evaluate.routing_stats`; per
layer, the experts whose share of the metric (token_ratio, or ESFT's gate_score) first adds up to P
are kept (`adapters.selection.select_experts`, the algorithm `moetune experts profile` uses). The run
folder gets selection.json (what `adapter.experts` accepts as a file) and selection.png (expert load
per layer, the selection outlined). Presets load the same weights every time, so a resumed run
profiles the same model and selects the same experts.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.errors import MoetuneError
from finetune.recipe import Recipe


@dataclass
class RunSelection:
    """The experts a run selected, and the routing statistics they came from."""

    selection: dict[int, list[int]]
    stats: dict[str, Any]
    spec: dict[str, Any]  # adapter.experts as the recipe gave it
    source: str  # what was profiled, for the files

    def __str__(self) -> str:
        chosen = sum(len(ids) for ids in self.selection.values())
        total = len(self.stats["layers"]) * self.stats["num_experts"]
        metric = self.spec.get("metric", "token_ratio")
        return (
            f"ESFT: profiled {self.stats['tokens']} tokens of {self.source}; selected {chosen} of {total} "
            f"experts ({metric} share >= {self.spec['threshold']} per layer): selection.json, selection.png"
        )

    def write(self, run_dir: Path) -> list[Path]:
        """RUN/selection.json and RUN/selection.png; returns their paths."""
        import matplotlib.pyplot as plt

        from finetune.evaluate import profile_figure

        metric, threshold = self.spec.get("metric", "token_ratio"), self.spec["threshold"]
        run_dir.mkdir(parents=True, exist_ok=True)
        doc = {
            "data": self.source,
            "examples": self.stats["examples"],
            "tokens": self.stats["tokens"],
            "metric": metric,
            "threshold": threshold,
            "layers": {str(layer): ids for layer, ids in self.selection.items()},
        }
        (run_dir / "selection.json").write_text(json.dumps(doc, indent=2) + "\n")
        title = f"expert load on {self.source}; selected (p={threshold}, {metric}) outlined"
        fig = profile_figure(self.stats, self.selection, title)
        fig.savefig(run_dir / "selection.png", dpi=100)
        plt.close(fig)
        return [run_dir / "selection.json", run_dir / "selection.png"]


def _profile_batches(dataset: Any, limit: int) -> list[dict[str, torch.Tensor]]:
    """One example per batch (no padding: every routed token is real), `limit` at most."""
    batches = []
    for i in range(min(len(dataset), limit)):
        example = dataset[i]
        if "input_ids" not in example:
            raise MoetuneError(
                "adapter.experts {threshold: ..} profiles text examples; this data has none (multimodal "
                "encoder-only records): give a selection.json from `moetune experts profile` instead"
            )
        ids = torch.tensor([example["input_ids"]])
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if example.get("position_ids") is not None:  # packed rows: positions restart per document
            batch["position_ids"] = torch.tensor([example["position_ids"]])
        batches.append(batch)
    return batches


def select_for_run(model: nn.Module, recipe: Recipe, tokenizer: Any, train_set: Any) -> RunSelection:
    """Profile `model` (the base, before LoRA) on the ESFT data of `recipe` and select its experts."""
    from adapters.selection import select_experts
    from finetune.data import prepare_datasets
    from finetune.evaluate import routing_stats

    spec = recipe.adapter.experts
    limit = spec.get("max_examples", 256)
    if recipe.data.format == "multimodal":
        raise MoetuneError(
            "adapter.experts {threshold: ..} profiles text data; for data.format multimodal give a selection.json "
            "from `moetune experts profile`"
        )
    if spec.get("data") is None:
        dataset, source = train_set, "the training data"
    else:
        section = dataclasses.replace(
            recipe.data,
            train=spec["data"],
            eval=None,
            eval_fraction=None,
            retain=None,
            format=None,
            max_examples=limit,
        )
        dataset = prepare_datasets(
            section, tokenizer, seed=recipe.train.seed, what="adapter.experts.data"
        ).train
        source = spec["data"] if isinstance(spec["data"], str) else ", ".join(spec["data"])
    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in _profile_batches(dataset, limit)]
    stats = routing_stats(model, batches)
    stats["examples"] = len(batches)
    metric = spec.get("metric", "token_ratio")
    selection = select_experts(dict(zip(stats["layers"], stats[metric])), float(spec["threshold"]))
    return RunSelection(selection=selection, stats=stats, spec=dict(spec), source=source)
