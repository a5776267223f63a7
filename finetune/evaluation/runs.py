"""What a training run measures before the first step, every `train.eval_every` steps and at the end.

`RunEvaluation.measure` returns one dict whose keys are the logged names (TensorBoard, history.json):
- `eval/loss`, `eval/perplexity`: the held-out loss on the first `train.eval_batches` batches, each
  process taking its share (finetune/evaluate.py);
- `eval/<metric>` for each task metric of `eval.metrics` (exact_match, word_accuracy, macro_f1,
  recall_at_1) on at most `eval.max_examples` held-out examples; every process computes them on the
  same examples (generation is not sharded), so every process holds the same numbers;
- `retain/loss`: the loss on `data.retain` (a general-domain set: what the adaptation costs elsewhere);
- a preference run (`use_pairs`): `eval/preference_loss` and `eval/rewards/*` on the held-out pairs,
  and `eval/loss` is the SFT loss of their chosen answers (finetune/preference.py).
metrics.json names them with `_` for `/` and `_before` / `_after` (`eval_exact_match_after`,
`retain_loss_before`): finetune/reporting.py.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils.data import Subset

from finetune.evaluate import eval_batches, evaluate_across_processes
from finetune.evaluation.tasks import task_metrics
from finetune.preference import chosen_half, evaluate_preference
from finetune.recipe import Recipe


class RunEvaluation:
    """The fixed eval batches of a run and the measurements taken on them."""

    def __init__(
        self,
        recipe: Recipe,
        tokenizer: Any,
        eval_set: Any,
        collate: Any,
        retain_set: Any = None,
    ) -> None:
        t, e = recipe.train, recipe.eval
        self.tokenizer, self.max_new_tokens = tokenizer, e.max_new_tokens
        self.loss_batches = eval_batches(eval_set, collate, t.batch_size, t.eval_batches)
        self.lm = any("labels" in b for b in self.loss_batches)  # text targets (else encoder-only losses)
        self.tasks = [name for name in e.metrics if name != "loss"]
        self.metric_batches: list[dict[str, Any]] = []
        if self.tasks and eval_set is not None:
            if e.max_examples is not None and e.max_examples < len(eval_set):
                eval_set = Subset(eval_set, range(e.max_examples))
            self.metric_batches = eval_batches(eval_set, collate, e.batch_size or t.batch_size, None)
        self.retain_batches = eval_batches(retain_set, collate, t.batch_size, t.eval_batches)
        self.pair_batches: list[dict[str, Any]] = []
        self.objective = None  # a preference run's objective (PreferenceObjective)

    def use_pairs(self, objective: Any) -> None:
        """A preference run: the held-out batches are pairs, measured with `objective`; the loss is taken
        on their chosen halves."""
        self.objective, self.pair_batches = objective, self.loss_batches
        self.loss_batches = [chosen_half(b) for b in self.pair_batches]
        self.lm = any("labels" in b for b in self.loss_batches)

    @property
    def active(self) -> bool:
        """True when there is anything to measure (held-out or retain data)."""
        return bool(self.loss_batches or self.retain_batches)

    def measure(self, acc: Any, model: nn.Module) -> dict[str, float]:
        """Every measurement of the run on `model` (the prepared one: `acc` unwraps it to generate)."""
        out: dict[str, float] = {}
        if self.loss_batches:
            result = evaluate_across_processes(acc, model, self.loss_batches, lm=self.lm)
            out["eval/loss"], out["eval/perplexity"] = result["loss"], result["perplexity"]
        if self.metric_batches:
            with acc.autocast():
                values = task_metrics(
                    acc.unwrap_model(model),
                    self.metric_batches,
                    self.tasks,
                    self.tokenizer,
                    max_new_tokens=self.max_new_tokens,
                )
            out.update({f"eval/{name}": value for name, value in values.items()})
        if self.retain_batches:
            out["retain/loss"] = evaluate_across_processes(acc, model, self.retain_batches, lm=True)["loss"]
        if self.objective is not None:
            pairs = evaluate_preference(acc, model, self.pair_batches, self.objective)
            out |= {"eval/preference_loss" if k == "loss" else f"eval/{k}": v for k, v in pairs.items()}
        return out
