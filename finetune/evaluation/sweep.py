"""`moetune sweep`: the parameter-efficiency curve of a recipe, one training run per grid point.

    moetune sweep quickstart --grid adapter.r=2,4,8,16 [--grid adapter.experts.threshold=0.5,0.8,1.0]

Every combination of the grids is a point; each trains with `finetune.train.launch_training` (the one
loop) into OUTPUT/<point>/, sequentially. The sweep is resumable: a point whose run finished
(OUTPUT/<point>/metrics.json) is read, not rerun; one interrupted mid-run continues from its last
checkpoint. Then it writes OUTPUT/sweep.csv, sweep.md and sweep.png: the held-out gain
(eval_loss_before - eval_loss_after) against the share of trainable parameters, with the retain-loss
change on a second panel when the recipe has `data.retain`, and names the smallest budget whose gain
reaches 92% of the best one (the seed's practice claim: "5% of the parameters reach 92% of the effect").
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.errors import MoetuneError

SHARE_OF_BEST = 0.92


@dataclass
class SweepPoint:
    """One grid point and what its run reached."""

    settings: dict[str, Any]  # grid key -> value
    run_dir: Path
    trainable_params: int
    total_params: int
    eval_loss_before: float
    eval_loss_after: float
    retain_loss_before: float | None = None
    retain_loss_after: float | None = None
    reused: bool = False  # finished before this sweep started: read, not rerun

    @property
    def share(self) -> float:
        """Trainable parameters / all parameters."""
        return self.trainable_params / self.total_params

    @property
    def gain(self) -> float:
        """Held-out loss reduction (nats per token)."""
        return self.eval_loss_before - self.eval_loss_after

    @property
    def retain_change(self) -> float | None:
        """Retain-loss increase (what the adaptation cost elsewhere); None without data.retain."""
        if self.retain_loss_before is None or self.retain_loss_after is None:
            return None
        return self.retain_loss_after - self.retain_loss_before

    def row(self) -> dict[str, Any]:
        return {
            **{key: _show(value) for key, value in self.settings.items()},
            "trainable_params": self.trainable_params,
            "trainable_share": self.share,
            "eval_loss_before": self.eval_loss_before,
            "eval_loss_after": self.eval_loss_after,
            "gain": self.gain,
            "retain_loss_change": self.retain_change,
            "run_dir": str(self.run_dir),
        }


@dataclass
class SweepResult:
    """A finished sweep; `str()` is what `moetune sweep` prints, `as_dict()` its --json."""

    output: Path
    points: list[SweepPoint]
    files: list[Path] = field(default_factory=list)

    @property
    def smallest_reaching(self) -> SweepPoint | None:
        """The point with the fewest trainable parameters whose gain reaches 92% of the best gain."""
        best = max((p.gain for p in self.points), default=0.0)
        if best <= 0:
            return None
        reaching = [p for p in self.points if p.gain >= SHARE_OF_BEST * best]
        return min(reaching, key=lambda p: (p.trainable_params, -p.gain))

    def __str__(self) -> str:
        reused = sum(p.reused for p in self.points)
        lines = [
            f"sweep of {len(self.points)} point(s) in {self.output} ({reused} finished earlier, not rerun)"
        ]
        lines += [
            f"  {_settings(p.settings)}: {p.share:.2%} trainable, gain {p.gain:.4f}"
            + (f", retain loss {p.retain_change:+.4f}" if p.retain_change is not None else "")
            for p in self.points
        ]
        point = self.smallest_reaching
        if point is None:
            lines.append("no point lowered the held-out loss: no 92% point")
        else:
            best = max(p.gain for p in self.points)
            lines.append(
                f"92% point: {_settings(point.settings)} ({point.share:.2%} of the parameters) reaches "
                f"{point.gain / best:.0%} of the best gain"
            )
        lines.append(f"wrote {', '.join(str(f) for f in self.files)}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        point = self.smallest_reaching
        return {
            "output": str(self.output),
            "points": [p.row() | {"reused": p.reused} for p in self.points],
            "smallest_reaching_92": point.row() if point else None,
            "files": [str(f) for f in self.files],
        }


def _show(value: Any) -> Any:
    return value if isinstance(value, int | float | str | bool) else json.dumps(value)


def _settings(settings: dict[str, Any]) -> str:
    return ", ".join(f"{key}={_show(value)}" for key, value in settings.items())


def parse_grid(grids: Sequence[str]) -> list[tuple[str, list[Any]]]:
    """["adapter.r=2,4"] -> [("adapter.r", [2, 4])]; values are read as YAML scalars."""
    from finetune.recipe import parse_yaml

    parsed = []
    for grid in grids:
        key, sep, text = grid.partition("=")
        key = key.strip()
        values = [parse_yaml(v.strip(), f"--grid {grid}") for v in text.split(",") if v.strip()]
        if not sep or key.count(".") not in (1, 2) or not values:
            raise MoetuneError(
                f"--grid {grid!r}: expected SECTION.KEY=V1,V2,... (e.g. adapter.r=2,4,8,16 or "
                "adapter.experts.threshold=0.5,0.8,1.0)"
            )
        if any(key == seen for seen, _ in parsed):
            raise MoetuneError(f"--grid {key} given twice; list all its values in one --grid")
        parsed.append((key, values))
    return parsed


def point_overrides(base: Any, settings: dict[str, Any]) -> list[str]:
    """--set overrides of one point; a 3-part key (adapter.experts.threshold) sets a key inside a mapping."""
    overrides, nested = [], {}
    for key, value in settings.items():
        section, name, *inner = key.split(".")
        if inner:
            current = nested.setdefault((section, name), dict(_mapping_value(base, section, name)))
            current[inner[0]] = value
        else:
            overrides.append(f"{section}.{name}={json.dumps(value)}")
    overrides += [f"{section}.{name}={json.dumps(value)}" for (section, name), value in nested.items()]
    return overrides


def _mapping_value(base: Any, section: str, name: str) -> dict[str, Any]:
    value = getattr(getattr(base, section), name, None)
    if value is None or (isinstance(value, dict) and all(isinstance(k, str) for k in value)):
        return value or {}
    raise MoetuneError(f"--grid {section}.{name}.KEY: the recipe's {section}.{name} is not a mapping of keys")


def _slug(settings: dict[str, Any]) -> str:
    """The folder of a point: `r=2`, `r=2,threshold=0.5` (the last part of each key)."""
    text = ",".join(f"{key.rsplit('.', 1)[-1]}={_show(value)}" for key, value in settings.items())
    return "".join(c if c.isalnum() or c in "=,.-_" else "_" for c in text)


def _read_point(settings: dict[str, Any], run_dir: Path, reused: bool) -> SweepPoint:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if metrics.get("eval_loss_before") is None or metrics.get("eval_loss_after") is None:
        raise MoetuneError(
            f"{run_dir}: the run measured no held-out loss; a sweep needs eval data (data.eval or "
            "data.eval_fraction)"
        )
    return SweepPoint(
        settings=settings,
        run_dir=run_dir,
        trainable_params=metrics["trainable_params"],
        total_params=metrics["total_params"],
        eval_loss_before=metrics["eval_loss_before"],
        eval_loss_after=metrics["eval_loss_after"],
        retain_loss_before=metrics.get("retain_loss_before"),
        retain_loss_after=metrics.get("retain_loss_after"),
        reused=reused,
    )


def run_sweep(
    recipe: str | os.PathLike,
    grids: Sequence[str],
    *,
    output: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
) -> SweepResult:
    """Train every grid point of `recipe` (resumable), then write the table and the curve."""
    from finetune import checkpoint as ckpt
    from finetune.recipe import load_recipe
    from finetune.train import launch_training

    base = load_recipe(str(recipe), overrides)  # a bad recipe or override fails before any training
    parsed = parse_grid(grids)
    if not parsed:
        raise MoetuneError("moetune sweep needs at least one --grid SECTION.KEY=V1,V2,...")
    if base.data.eval is None and base.data.eval_fraction is None:
        raise MoetuneError(f"{recipe}: a sweep compares held-out gains; set data.eval or data.eval_fraction")
    out = Path(output or Path(base.output.dir).parent / f"sweep-{Path(base.output.dir).name}")
    points = []
    for values in itertools.product(*(v for _, v in parsed)):
        settings = dict(zip((k for k, _ in parsed), values))
        run_dir = out / _slug(settings)
        sets = [*overrides, *point_overrides(base, settings)]
        load_recipe(str(recipe), sets)  # every point valid before the first trains
        points.append((settings, run_dir, sets))
    finished = []
    for number, (settings, run_dir, sets) in enumerate(points, 1):
        done = (run_dir / "metrics.json").is_file() and (
            run_dir / "adapter" / "adapter_config.json"
        ).is_file()
        if not done:
            print(
                f"sweep: point {number} of {len(points)}: {_settings(settings)} -> {run_dir}", file=sys.stderr
            )
            partial = ckpt.latest_checkpoint(run_dir) is not None
            # The runs' own lines go to stderr: stdout carries the sweep's result (--json stays parseable).
            with contextlib.redirect_stdout(sys.stderr):
                launch_training(
                    str(recipe),
                    overrides=sets,
                    output_dir=run_dir,
                    resume=partial,
                    overwrite=not partial and run_dir.exists(),
                )
        finished.append(_read_point(settings, run_dir, reused=done))
    result = SweepResult(out, finished)
    result.files = _write(result, has_retain=base.data.retain is not None)
    return result


# ----------------------------------------------------------------------------- outputs


def _write(result: SweepResult, *, has_retain: bool) -> list[Path]:
    rows = [p.row() for p in result.points]
    csv_path, md_path, png_path = (result.output / f"sweep.{ext}" for ext in ("csv", "md", "png"))
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    md_path.write_text(_markdown(result), encoding="utf-8")
    _plot(result, png_path, has_retain=has_retain)
    return [csv_path, md_path, png_path]


def _markdown(result: SweepResult) -> str:
    keys = list(result.points[0].settings)
    head = [*keys, "trainable", "share", "eval loss before", "after", "gain", "retain loss change"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for p in result.points:
        retain = f"{p.retain_change:+.4f}" if p.retain_change is not None else "-"
        cells = [
            *(str(_show(p.settings[k])) for k in keys),
            f"{p.trainable_params:,}",
            f"{p.share:.2%}",
            f"{p.eval_loss_before:.4f}",
            f"{p.eval_loss_after:.4f}",
            f"{p.gain:.4f}",
            retain,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    point = result.smallest_reaching
    if point is not None:
        lines += [
            "",
            f"Smallest budget reaching {SHARE_OF_BEST:.0%} of the best gain: {_settings(point.settings)} "
            f"({point.share:.2%} of the parameters trainable).",
        ]
    return "\n".join(lines) + "\n"


def _plot(result: SweepResult, path: Path, *, has_retain: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    percent = FuncFormatter(lambda value, _: f"{value:g}%")  # log axes otherwise label 2x10^0
    points = sorted(result.points, key=lambda p: p.share)
    fig, axes = plt.subplots(
        1, 2 if has_retain else 1, figsize=(12 if has_retain else 7, 4), dpi=110, squeeze=False
    )
    ax = axes[0][0]
    ax.plot([100 * p.share for p in points], [p.gain for p in points], "o-", color="tab:blue")
    for p in points:
        ax.annotate(
            _slug(p.settings), (100 * p.share, p.gain), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    best = max(p.gain for p in points)
    if best > 0:
        ax.axhline(
            SHARE_OF_BEST * best, color="tab:gray", linestyle="--", linewidth=1, label="92% of the best gain"
        )
        chosen = result.smallest_reaching
        ax.plot(
            [100 * chosen.share],
            [chosen.gain],
            "*",
            color="tab:red",
            markersize=14,
            label="smallest reaching it",
        )
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(percent)
    ax.xaxis.set_minor_formatter(percent)
    ax.set_xlabel("trainable parameters (share of the model, log scale)")
    ax.set_ylabel("held-out gain (eval loss before - after)")
    ax.set_title("parameter efficiency")
    ax.grid(alpha=0.3)
    if has_retain:
        ax = axes[0][1]
        kept = [p for p in points if p.retain_change is not None]
        ax.plot([100 * p.share for p in kept], [p.retain_change for p in kept], "s-", color="tab:orange")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(percent)
        ax.xaxis.set_minor_formatter(percent)
        ax.set_xlabel("trainable parameters (share of the model, log scale)")
        ax.set_ylabel("retain loss after - before")
        ax.set_title("retention (data.retain)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


__all__ = ["SHARE_OF_BEST", "SweepPoint", "SweepResult", "parse_grid", "point_overrides", "run_sweep"]
