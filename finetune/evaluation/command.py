"""`moetune evaluate`: a run's measurements on a MODEL (+ adapter) and a data source, outside training.

The examples are built exactly as training builds them: when the adapter folder holds the recipe it
was trained with (recipe.yaml), its `data` settings (fields, template, max_length, multimodal options)
and `model` settings (dtype, preset modalities) and its batch size are used, with `--data` as the source
and `--format` when given; `--data` equal to the recipe's `data.eval` is read as the held-out set
(a generated `synthetic:` set draws the held-out seed). So evaluating a finished run's adapter on its `data.eval` file gives the run's final eval
loss (all of it: the run used its first `train.eval_batches` batches).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.errors import MoetuneError
from finetune.evaluation.metrics import METRICS


@dataclass
class EvalResult:
    """What `moetune evaluate` measured; `str()` is the line it prints, `as_dict()` its --json."""

    model: str
    adapter: str | None
    data: str
    examples: int
    values: dict[str, float] = field(default_factory=dict)  # loss, perplexity, exact_match, ...

    def __str__(self) -> str:
        parts = []
        for name, value in self.values.items():
            if name == "perplexity":
                continue
            parts.append(f"{name} {value:.4f}")
            ppl = self.values.get("perplexity")
            if name == "loss" and ppl is not None and math.isfinite(ppl):
                parts[-1] += f" (perplexity {ppl:.2f})"
        what = self.model + (f" + {self.adapter}" if self.adapter else "")
        return f"{what} on {self.data} ({self.examples} examples): {'; '.join(parts)}"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _trained_recipe(adapter: str | None) -> Any:
    """The Recipe saved next to an adapter (None when there is none)."""
    if adapter is None or not (Path(adapter) / "recipe.yaml").is_file():
        return None
    from finetune.recipe import load_recipe

    return load_recipe(str(Path(adapter) / "recipe.yaml"))


def evaluate_model(
    model: str,
    data: str,
    *,
    adapter: str | None = None,
    format: str | None = None,
    metrics: list[str] | tuple[str, ...] = ("loss",),
    batch_size: int | None = None,
    max_examples: int | None = None,
    max_length: int | None = None,
    max_new_tokens: int = 32,
    quantize: str | None = None,
    trust_remote_code: bool = False,
) -> EvalResult:
    """`metrics` (of METRICS) of `model` (+ `adapter`) on the examples of `data`; see the module docstring."""
    import torch

    from finetune.data import make_collator, prepare_datasets
    from finetune.evaluate import eval_batches, evaluate_loss, evaluate_multimodal_losses
    from finetune.evaluation.tasks import task_metrics
    from finetune.loading import load_model, load_tokenizer
    from finetune.recipe import DataSection

    unknown = [name for name in metrics if name not in METRICS]
    if unknown or not metrics:
        raise MoetuneError(f"--metrics {','.join(metrics)}: choose from {', '.join(METRICS)}")
    sizes = {
        "--batch-size": batch_size,
        "--max-examples": max_examples,
        "--max-length": max_length,
        "--max-new-tokens": max_new_tokens,
    }
    for flag, value in sizes.items():
        if value is not None and value < 1:
            raise MoetuneError(f"{flag} must be >= 1, got {value}")
    trained = _trained_recipe(adapter)
    section = trained.data if trained is not None else DataSection(train=data)
    tasks = [name for name in metrics if name != "loss"]
    section = dataclasses.replace(
        section,
        train=data,
        eval=None,
        eval_fraction=None,
        retain=None,
        format=format or section.format,
        max_length=max_length or section.max_length,
        max_examples=max_examples,
        max_eval_examples=None,
        packing=section.packing and not tasks,  # generation needs whole examples
        group_by_length=False,
    )
    modalities = None
    if trained is not None and trained.model.name == model:  # a preset with encoders: as trained
        modalities = trained.model.modalities
    net, tokenizer = load_model(
        model,
        dtype=trained.model.dtype if trained is not None else None,
        modalities=modalities,
        quantize=quantize,
        trust_remote_code=trust_remote_code,
    )
    if adapter is not None:  # a classification adapter keeps its label order in a saved processor
        tokenizer = load_tokenizer(Path(adapter)) or tokenizer
    if tokenizer is None:
        raise MoetuneError(f"{model}: no tokenizer found next to the model; evaluate needs one")
    # The run's own held-out source is read as data.eval (generated `synthetic:` sets draw its seed).
    what = "data.eval" if trained is not None and data == trained.data.eval else "--data"
    dataset = prepare_datasets(section, tokenizer, seed=trained.train.seed if trained else 0, what=what).train
    label_names = getattr(dataset, "label_names", None) or getattr(tokenizer, "label_names", None)
    if label_names and hasattr(net, "set_label_names"):
        net.set_label_names(list(label_names))  # the head sized and ordered as in training
    if adapter is not None:
        from adapters import load_adapter

        net = load_adapter(net, adapter, base=model)
    net.eval()
    if batch_size is None:  # the run's: contrastive losses depend on which examples share a batch
        batch_size = trained.train.batch_size if trained is not None else 8
    batches = eval_batches(dataset, make_collator(section, tokenizer), batch_size, None)
    device = next(net.parameters()).device
    values: dict[str, float] = {}
    if "loss" in metrics:
        on_device = [
            {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches
        ]
        if any("labels" in b for b in batches):
            result = evaluate_loss(net, on_device)
            values["loss"], values["perplexity"] = result["loss"], result["perplexity"]
        else:  # encoder-only examples: contrastive + classification loss per example
            values["loss"] = evaluate_multimodal_losses(net, on_device)["loss"]
    if tasks:
        values.update(task_metrics(net, batches, tasks, tokenizer, max_new_tokens=max_new_tokens))
    return EvalResult(model=model, adapter=adapter, data=data, examples=len(dataset), values=values)
