"""PNG plots of a run: loss curves (with the task metrics of `eval.metrics` beside them), and the
expert load of every MoE layer before and after training.

matplotlib with the non-interactive Agg backend (no display needed: servers, CI, containers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def write_run_plots(
    folder: Path,
    *,
    train_loss: Sequence[Sequence[float]],
    eval_loss: Sequence[Sequence[float]],
    load_before: Sequence[Sequence[float]] | None,
    load_after: Sequence[Sequence[float]] | None,
    curves: Mapping[str, Sequence[Sequence[float]]] | None = None,
) -> list[Path]:
    """Write every plot the data allows; returns their paths. `curves`: [step, value] rows by logged
    name (`retain/loss` joins the loss axes, task metrics get a panel of their own)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if train_loss or eval_loss or curves:
        written.append(plot_loss(folder / "loss.png", train_loss, eval_loss, curves))
    if load_before is not None and load_after is not None:
        written.append(plot_expert_load(folder / "expert_load.png", load_before, load_after))
    return written


def plot_loss(
    path: Path,
    train_loss: Sequence[Sequence[float]],
    eval_loss: Sequence[Sequence[float]],
    curves: Mapping[str, Sequence[Sequence[float]]] | None = None,
) -> Path:
    """Train loss per step (raw, and a moving average), eval loss and the other loss curves (retain)
    at their steps; the task metrics (0..1) on a second panel when there are any."""
    curves = {name: rows for name, rows in (curves or {}).items() if rows}
    loss_curves = {name: rows for name, rows in curves.items() if name.endswith("loss")}
    task_curves = {name: rows for name, rows in curves.items() if name not in loss_curves}
    fig, axes = plt.subplots(
        1, 2 if task_curves else 1, figsize=(12 if task_curves else 7, 4), dpi=110, squeeze=False
    )
    ax = axes[0][0]
    if train_loss:
        steps, losses = zip(*train_loss)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train (per step)")
        window = max(1, len(losses) // 20)
        if window > 1:
            smooth = [
                sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
                for i in range(len(losses))
            ]
            ax.plot(steps, smooth, color="tab:blue", linewidth=1.6, label=f"train (mean of {window})")
    if eval_loss:
        steps, losses = zip(*eval_loss)
        ax.plot(steps, losses, "o-", color="tab:orange", linewidth=1.6, label="eval")
    for name, rows in loss_curves.items():
        steps, values = zip(*rows)
        ax.plot(steps, values, "s--", linewidth=1.4, label=name.replace("/", " "))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if task_curves:
        ax = axes[0][1]
        for name, rows in task_curves.items():
            steps, values = zip(*rows)
            ax.plot(steps, values, "o-", linewidth=1.6, label=name.removeprefix("eval/"))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("held-out score")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("task metrics (eval.metrics)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


MAX_EXPERT_TICKS = 32  # beyond this many experts, label every k-th so the labels stay readable


def expert_ticks(num_experts: int, max_ticks: int = MAX_EXPERT_TICKS) -> list[int]:
    """Expert ids to label on an axis: every one up to `max_ticks` experts, else every k-th (0, k, 2k, ...)."""
    step = max(1, math.ceil(num_experts / max_ticks))
    return list(range(0, num_experts, step))


def label_expert_axis(ax, num_experts: int) -> None:
    """Expert ids on the x axis (every one, or every k-th on wide models), named in the axis label."""
    ticks = expert_ticks(num_experts)
    ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7 if len(ticks) > 16 else None)
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1
    ax.set_xlabel("expert" if step == 1 else f"expert (a label every {step})")


def expert_load_figure(before: Sequence[Sequence[float]], after: Sequence[Sequence[float]]):
    """The figure of `plot_expert_load` (returned, so tests can read its axes)."""
    layers, experts = len(before), max((len(row) for row in before), default=0)
    uniform = 1.0 / experts if experts else 0.0
    change = [[a - b for a, b in zip(ra, rb)] for ra, rb in zip(after, before)]
    vmax = max((v for rows in (before, after) for row in rows for v in row), default=1.0) or 1.0
    dmax = max((abs(v) for row in change for v in row), default=1.0) or 1.0
    width = min(16.0, 4.0 + 0.12 * experts * 3)
    height = min(12.0, 2.0 + 0.35 * layers)
    fig, axes = plt.subplots(1, 3, figsize=(width, height), dpi=110, squeeze=False)
    panels = (
        (before, "before", "viridis", 0.0, vmax),
        (after, "after", "viridis", 0.0, vmax),
        (change, "after - before", "coolwarm", -dmax, dmax),
    )
    for ax, (data, title, cmap, lo, hi) in zip(axes[0], panels):
        image = ax.imshow(data, aspect="auto", cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(title)
        label_expert_axis(ax, experts)
        ax.set_ylabel("MoE layer")
        ax.set_yticks(range(layers))
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"share of routed tokens per expert (uniform = {uniform:.3g}); {_imbalance(before, after)}")
    fig.tight_layout()
    return fig


def plot_expert_load(path: Path, before: Sequence[Sequence[float]], after: Sequence[Sequence[float]]) -> Path:
    """Heat maps (MoE layer x expert) of the share of routed tokens, before, after, and the change."""
    fig = expert_load_figure(before, after)
    fig.savefig(path)
    plt.close(fig)
    return path


def _imbalance(before: Sequence[Sequence[float]], after: Sequence[Sequence[float]]) -> str:
    """Mean over layers of max share / uniform share: 1 is perfectly balanced."""

    def score(rows: Sequence[Sequence[float]]) -> float:
        values = [max(row) * len(row) for row in rows if row]
        return sum(values) / len(values) if values else math.nan

    return f"max/uniform {score(before):.2f} -> {score(after):.2f}"
