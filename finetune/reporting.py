"""What a training run reports: its log lines, metrics.json, history.json, plots, model card, summary,
and the adapter folder they end up in.

- while it runs: `Console` (lines from the main process, the progress bar with loss, lr, tokens/s);
- every `train.log_every` steps: `LogWindow` (train/loss, aux_loss, grad_norm, tokens/s averaged over
  the window) and `ExpertLoad` (per MoE layer, how evenly the routed tokens spread over the experts);
- every eval: `record_baseline` (before the first step) and `record_eval` keep its numbers in the
  run state (the histories behind the plots and metrics.json);
- at the end: `write_outputs` writes the adapter folder (whole or not at all) and the run's reports:
  `RunMetrics` (metrics.json, in the run folder and in the adapter folder, and the model card's
  metrics), `write_history` (history.json: the plots' data), `write_plots`, `write_card`;
- `TrainResult`: what `launch_training` returns and `moetune train` prints.

A new metric (a task score from evaluation, a preference margin) is one more field of `RunMetrics`
and one more key of the logged dicts; the loop only hands the numbers over.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from finetune import checkpoint as ckpt

if TYPE_CHECKING:
    from accelerate import Accelerator

    from finetune.recipe import Recipe
    from finetune.resume import RunState


# Logged at every eval but kept in the run state elsewhere (eval_loss; a preference run's eval_rewards)
# or derived (perplexity): name prefixes. None of them is a task metric.
NOT_TRACKED = ("eval/loss", "eval/perplexity", "eval/preference_loss", "eval/rewards/")


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))


def input_token_count(batch: dict[str, torch.Tensor]) -> int:
    """Decoder input tokens of a batch (0 for batches that only feed the modality encoders)."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return int(mask.sum().item())
    return int(batch["input_ids"].numel()) if "input_ids" in batch else 0


# ----------------------------------------------------------------------------- every log_every steps


class Console:
    """What a run shows while it runs: lines from the main process, and the progress bar of each
    machine's main process, with the lines written above it."""

    def __init__(self, acc: Accelerator) -> None:
        self.main, self.local_main = acc.is_main_process, acc.is_local_main_process
        self.bar = None  # tqdm, from `start` on

    def say(self, text: str, *, err: bool = False) -> None:
        """A line on the main process (stderr with `err`), written above the progress bar."""
        if not self.main:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.write(text, file=sys.stderr if err else None)
        else:
            print(text, flush=True, file=sys.stderr if err else sys.stdout)

    def start(self, total_steps: int, done: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total_steps,
            initial=done,
            desc="train",
            unit="step",
            disable=not self.local_main,
            dynamic_ncols=True,
        )

    def step(self, logged: dict[str, float] | None = None) -> None:
        """One more step done; `logged`: the numbers of a logging step, shown beside the bar."""
        self.bar.update(1)
        if logged is not None:
            self.bar.set_postfix(
                loss=f"{logged['train/loss']:.4f}",
                lr=f"{logged['train/lr']:.2e}",
                tok_s=f"{logged['train/tokens_per_second']:.0f}",
            )

    def close(self) -> None:
        self.bar.close()


@dataclass
class StepResult:
    """What one optimizer step reports (all processes together)."""

    loss: float  # nan for a skipped step
    aux_loss: float
    grad_norm: float
    tokens: int  # input tokens
    metrics: dict[str, float] = dataclasses.field(
        default_factory=dict
    )  # train/rewards/* of a preference step


class LogWindow:
    """Averages of the steps since the last log line."""

    def __init__(self) -> None:
        self.rows: list[StepResult] = []
        self.seconds = 0.0

    def add(self, result: StepResult, seconds: float) -> None:
        self.rows.append(result)
        self.seconds += seconds

    def flush(self) -> dict[str, float]:
        finite = [r.loss for r in self.rows if math.isfinite(r.loss)]
        out = {
            "train/loss": sum(finite) / len(finite) if finite else float("nan"),
            "train/aux_loss": sum(r.aux_loss for r in self.rows) / len(self.rows),
            "train/grad_norm": sum(r.grad_norm for r in self.rows) / len(self.rows),
            "train/tokens_per_second": sum(r.tokens for r in self.rows) / max(self.seconds, 1e-9),
        }
        measured = [r.metrics for r in self.rows if r.metrics]
        for key in measured[0] if measured else ():
            out[key] = sum(m[key] for m in measured) / len(measured)
        self.rows, self.seconds = [], 0.0
        return out


class ExpertLoad:
    """Counts of routed tokens per (MoE layer, expert) during training, logged every log_every steps."""

    def __init__(self) -> None:
        self.counts: torch.Tensor | None = None  # (L, E)

    def add(self, router_logits: Any, batch: dict[str, torch.Tensor], *, top_k: int | None) -> None:
        if not router_logits or not top_k:
            return
        mask = batch.get("attention_mask")
        keep = mask.reshape(-1).bool() if mask is not None else None
        rows = []
        for logits in router_logits:  # one (B*T, E) per MoE layer
            logits = logits.detach().reshape(-1, logits.size(-1))
            if keep is not None and keep.numel() == logits.size(0):
                logits = logits[keep.to(logits.device)]
            chosen = logits.topk(top_k, dim=-1).indices.reshape(-1)  # (N*k,)
            rows.append(torch.bincount(chosen, minlength=logits.size(-1)).float())
        counts = torch.stack(rows)
        self.counts = counts if self.counts is None else self.counts + counts

    def flush(self, acc: Accelerator) -> dict[str, float]:
        if self.counts is None:
            return {}
        counts = acc.reduce(self.counts, "sum")
        self.counts = None
        out = {}
        for layer, row in enumerate(counts):
            mean = row.mean().clamp_min(1e-9)
            out[f"expert_load/layer_{layer}/max_over_mean"] = float(row.max() / mean)
            out[f"expert_load/layer_{layer}/cv"] = float(row.std(unbiased=False) / mean)
        return out


def eval_line(result: dict[str, float]) -> str:
    """One eval's log line: `eval loss 2.1234 (perplexity 8.37); exact_match 0.4100; retain loss 3.0120`."""
    parts = []
    if "eval/loss" in result:
        ppl = result.get("eval/perplexity")
        extra = f" (perplexity {ppl:.2f})" if ppl is not None and math.isfinite(ppl) else ""
        parts.append(f"eval loss {result['eval/loss']:.4f}{extra}")
    tasks = {k: v for k, v in result.items() if k.startswith("eval/") and not k.startswith(NOT_TRACKED)}
    parts += [f"{name.removeprefix('eval/')} {value:.4f}" for name, value in tasks.items()]
    if "eval/rewards/accuracies" in result:  # a preference run's held-out pairs
        parts.append(
            f"reward accuracy {result['eval/rewards/accuracies']:.3f}, margin {result['eval/rewards/margins']:.3f}"
        )
    if "retain/loss" in result:
        parts.append(f"retain loss {result['retain/loss']:.4f}")
    return "; ".join(parts)


def metric_key(logged: str) -> str:
    """metrics.json's stem of a logged name: eval/exact_match -> eval_exact_match, retain/loss -> retain_loss."""
    return logged.replace("/", "_")


def reward_row(step: int, result: dict[str, float]) -> list[float]:
    """[step, reward accuracy, reward margin, preference loss] of a preference run's evaluation."""
    return [
        step,
        result["eval/rewards/accuracies"],
        result["eval/rewards/margins"],
        result["eval/preference_loss"],
    ]


def record_baseline(
    state: RunState, result: dict[str, float], *, preference: bool, expert_load: list[list[float]] | None
) -> None:
    """Keep the evaluation before the first step (`result`: logged names) and the base's expert load:
    the "before" of metrics.json and of the plots."""
    state.eval_loss_before = result.get("eval/loss")
    state.eval_metrics_before = {k: v for k, v in result.items() if not k.startswith(NOT_TRACKED)}
    state.expert_load_before = expert_load
    if preference:
        state.eval_rewards_before = reward_row(0, result)


def record_eval(state: RunState, step: int, result: dict[str, float], *, preference: bool) -> None:
    """Keep the evaluation after `step` (`result`: logged names) in the run state's histories."""
    if "eval/loss" in result:
        state.eval_loss.append([step, result["eval/loss"]])
    for name, value in result.items():
        if not name.startswith(NOT_TRACKED):
            state.eval_metrics.setdefault(name, []).append([step, value])
    if preference:
        state.eval_rewards.append(reward_row(step, result))


def tracker_config(recipe: Recipe) -> dict[str, Any]:
    """The recipe as flat scalars, the only kind TensorBoard's hparams accept."""
    from finetune.recipe import recipe_to_dict

    flat = {}
    for section, body in recipe_to_dict(recipe).items():
        for key, value in body.items():
            flat[f"{section}.{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat


# ----------------------------------------------------------------------------- at the end


@dataclass
class RunMetrics:
    """metrics.json: what the run did and reached (the model card shows it too)."""

    steps: int
    train_loss: float | None  # mean of the last log_every steps' losses
    eval_loss_before: float | None
    eval_loss_after: float | None
    perplexity_before: float | None  # None for encoder-only tasks (contrastive, classification)
    perplexity_after: float | None
    tokens: int
    tokens_per_second: float | None
    train_seconds: float
    trainable_params: int
    total_params: int
    skipped_steps: list[int]
    resumed_at: list[int]
    num_processes: int
    mixed_precision: str
    # eval.metrics and the retain loss: {eval_exact_match_before: .., eval_exact_match_after: ..,
    # retain_loss_before: .., ...}; written as top-level keys of metrics.json
    task_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    # preference runs (train.method dpo / orpo / simpo), on the held-out pairs; eval_loss_* is then the
    # SFT loss of their chosen answers
    reward_accuracy_before: float | None = None
    reward_accuracy_after: float | None = None
    reward_margin_before: float | None = None
    reward_margin_after: float | None = None

    @classmethod
    def of_run(
        cls,
        state: RunState,
        recipe: Recipe,
        *,
        eval_is_lm: bool,
        trainable_params: int,
        total_params: int,
        num_processes: int,
    ) -> RunMetrics:
        losses = [loss for _, loss in state.train_loss]
        tail = losses[-max(1, min(len(losses), recipe.train.log_every)) :]
        before, after = state.eval_loss_before, (state.eval_loss[-1][1] if state.eval_loss else None)
        task_metrics = {}
        for name in dict.fromkeys([*state.eval_metrics_before, *state.eval_metrics]):
            if name in state.eval_metrics_before:
                task_metrics[f"{metric_key(name)}_before"] = state.eval_metrics_before[name]
            if state.eval_metrics.get(name):
                task_metrics[f"{metric_key(name)}_after"] = state.eval_metrics[name][-1][1]
        rewards_before, rewards_after = state.eval_rewards_before, (state.eval_rewards or [None])[-1]
        return cls(
            steps=state.step,
            train_loss=sum(tail) / len(tail) if tail else None,
            eval_loss_before=before,
            eval_loss_after=after,
            perplexity_before=perplexity(before) if before is not None and eval_is_lm else None,
            perplexity_after=perplexity(after) if after is not None and eval_is_lm else None,
            tokens=state.tokens,
            tokens_per_second=state.tokens / state.train_seconds if state.train_seconds else None,
            train_seconds=state.train_seconds,
            trainable_params=trainable_params,
            total_params=total_params,
            skipped_steps=state.skipped_steps,
            resumed_at=state.resumed_at,
            num_processes=num_processes,
            mixed_precision=recipe.train.mixed_precision,
            task_metrics=task_metrics,
            reward_accuracy_before=rewards_before[1] if rewards_before else None,
            reward_accuracy_after=rewards_after[1] if rewards_after else None,
            reward_margin_before=rewards_before[2] if rewards_before else None,
            reward_margin_after=rewards_after[2] if rewards_after else None,
        )

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        tasks = out.pop("task_metrics")
        return {**out, **tasks}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> RunMetrics:
        """The metrics of a metrics.json (keys this version does not know are left out)."""
        names = {f.name for f in dataclasses.fields(cls)}
        tasks = {k: v for k, v in saved.items() if k not in names and k.endswith(("_before", "_after"))}
        return cls(**{k: v for k, v in saved.items() if k in names}, task_metrics=tasks)

    def before_after(self) -> list[tuple[str, float | None, float | None]]:
        """(stem, before, after) of each task metric and the retain loss, in the order measured."""
        stems = dict.fromkeys(k.rsplit("_", 1)[0] for k in self.task_metrics)
        return [
            (stem, self.task_metrics.get(f"{stem}_before"), self.task_metrics.get(f"{stem}_after"))
            for stem in stems
        ]


def write_outputs(
    run_dir: Path,
    model: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    recipe: Recipe,
    tokenizer: Any,
    state: RunState,
    metrics: RunMetrics,
    load_after: list[list[float]] | None,
) -> Path:
    """The end of a run, on the main process: RUN/adapter/ (PEFT's files, the recipe, a classifier's
    label order, metrics.json, the model card), written whole or not at all, then metrics.json,
    history.json and the plots in the run folder. `model` is the unwrapped PEFT model, `state_dict` its
    (gathered) weights. Returns the adapter folder."""
    from finetune.recipe import save_recipe

    adapter_bytes = ckpt.estimate_checkpoint_bytes(model, optimizer_states=0)
    ckpt.check_disk_space(run_dir, adapter_bytes, what="final adapter")
    images = write_plots(run_dir, state, load_after)
    adapter_dir = run_dir / "adapter"
    with ckpt.atomic_folder(adapter_dir) as tmp:
        # save_embedding_layers=False: the vocabulary is never resized here, so a frozen
        # lm_head / embedding is the base's own and does not belong in the adapter.
        model.save_pretrained(
            tmp, state_dict=state_dict, safe_serialization=True, save_embedding_layers=False
        )
        save_recipe(recipe, tmp / "recipe.yaml")
        if getattr(tokenizer, "label_names", None):  # classification: the label order
            tokenizer.save_pretrained(tmp)
        ckpt.write_json(tmp / "metrics.json", metrics.as_dict())
        write_card(tmp, recipe, metrics, images)
        ckpt.failpoint("adapter-mid-write")
    ckpt.write_json_atomic(run_dir / "metrics.json", metrics.as_dict())
    write_history(run_dir, state)
    return adapter_dir


def write_history(run_dir: Path, state: RunState) -> None:
    """history.json: train loss per step, eval loss per eval, skipped steps, task metrics (the plots' data);
    the held-out reward metrics of a preference run."""
    history = {k: getattr(state, k) for k in ("train_loss", "eval_loss", "skipped_steps", "eval_metrics")}
    if state.eval_rewards:  # preference runs: [step, reward accuracy, reward margin, preference loss]
        history["eval_rewards"] = [state.eval_rewards_before, *state.eval_rewards]
    ckpt.write_json_atomic(run_dir / "history.json", history)


def write_plots(run_dir: Path, state: RunState, load_after: list[list[float]] | None) -> list[Path]:
    """plots/loss.png and plots/expert_load.png (before vs after); returns the files written."""
    from finetune import plots

    before = [[0, state.eval_loss_before]] if state.eval_loss_before is not None else []
    curves = {
        name: ([[0, state.eval_metrics_before[name]]] if name in state.eval_metrics_before else []) + rows
        for name, rows in state.eval_metrics.items()
    }
    return plots.write_run_plots(
        run_dir / "plots",
        train_loss=state.train_loss,
        eval_loss=before + state.eval_loss,
        load_before=state.expert_load_before,
        load_after=load_after,
        curves=curves,
    )


def write_card(folder: Path, recipe: Recipe, metrics: RunMetrics, images: list[Path]) -> None:
    """The adapter's model card (README.md): base, data, metrics, plots, the resolved recipe."""
    from adapters.model_card import write_model_card
    from finetune.recipe import recipe_to_dict

    sources = recipe.data.train if isinstance(recipe.data.train, list) else [recipe.data.train]
    write_model_card(
        folder,
        base_model=recipe.model.name,
        kind="adapter",
        datasets=sources,
        metrics=metrics.as_dict(),
        recipe=recipe_to_dict(recipe),
        images=images,
    )


@dataclass
class TrainResult:
    """A finished run: its folder and metrics; `str()` is the summary `moetune train` prints."""

    run_dir: Path
    metrics: RunMetrics

    @property
    def adapter_dir(self) -> Path:
        return self.run_dir / "adapter"

    @classmethod
    def read(cls, run_dir: Path) -> TrainResult:
        """The result of the run written in `run_dir` (by another process: a launch of several)."""
        metrics = json.loads((Path(run_dir) / "metrics.json").read_text(encoding="utf-8"))
        return cls(Path(run_dir), RunMetrics.from_dict(metrics))

    def __str__(self) -> str:
        m = self.metrics
        lines = [f"trained {m.steps} steps in {m.train_seconds:.1f}s"]
        if m.resumed_at:
            lines[0] += f" (resumed at step {', '.join(map(str, m.resumed_at))})"
        if m.tokens_per_second:
            lines[0] += f" ({m.tokens_per_second:.0f} tokens/s on {m.num_processes} process(es))"
        if m.train_loss is not None:
            lines.append(f"train loss (last steps): {m.train_loss:.4f}")
        if m.eval_loss_before is not None and m.eval_loss_after is not None and m.perplexity_before is None:
            lines.append(  # encoder-only tasks: no perplexity to speak of
                f"held-out eval loss (contrastive + classification) {m.eval_loss_before:.4f} -> "
                f"{m.eval_loss_after:.4f}"
            )
        elif m.eval_loss_before is not None and m.eval_loss_after is not None:
            change = 100.0 * (1.0 - m.perplexity_after / m.perplexity_before)
            trend = f"{change:.1f}% lower" if change >= 0 else f"{-change:.1f}% HIGHER"
            chosen = " (chosen answers)" if m.reward_accuracy_before is not None else ""
            lines.append(
                f"held-out eval loss{chosen} {m.eval_loss_before:.4f} -> {m.eval_loss_after:.4f}; perplexity "
                f"{m.perplexity_before:.2f} -> {m.perplexity_after:.2f} ({trend})"
            )
        for stem, before, after in m.before_after():
            if before is None or after is None:
                continue
            if stem == "retain_loss":  # what the adaptation cost on general data
                lines.append(f"retain loss (data.retain) {before:.4f} -> {after:.4f} ({after - before:+.4f})")
            else:
                lines.append(f"eval {stem.removeprefix('eval_')} {before:.4f} -> {after:.4f}")
        if m.reward_accuracy_before is not None and m.reward_accuracy_after is not None:
            lines.append(
                f"held-out reward accuracy {m.reward_accuracy_before:.3f} -> {m.reward_accuracy_after:.3f}; "
                f"reward margin {m.reward_margin_before:.3f} -> {m.reward_margin_after:.3f}"
            )
        if m.skipped_steps:
            lines.append(f"skipped steps (non-finite): {m.skipped_steps}")
        lines.append(f"trainable parameters: {m.trainable_params:,} of {m.total_params:,}")
        lines.append(f"adapter: {self.adapter_dir}")
        lines.append(f"metrics: {self.run_dir / 'metrics.json'}; plots: {self.run_dir / 'plots'}")
        lines.append(f"logs: tensorboard --logdir {self.run_dir / 'logs'}")
        return "\n".join(lines)
