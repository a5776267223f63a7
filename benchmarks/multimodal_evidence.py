"""Evidence that the multimodal model learns: the four mm-* recipes through `moetune train` itself.

    python benchmarks/multimodal_evidence.py                  # all tasks (several minutes each on 2 cores)
    python benchmarks/multimodal_evidence.py --task caption   # caption | audio | classify | align
    python benchmarks/multimodal_evidence.py --quick          # a smoke run: 2 steps, 10 eval examples (/tmp)

Each task trains its recipe (recipes/mm-<task>.yaml) with `finetune.train.launch_training`, the one
training loop of the project, and reads the before / after values of the recipe's `eval.metrics` from
the run's metrics.json (`eval_<metric>_before` / `_after`):
- caption (mm-caption): exact match and word accuracy of the greedy caption of held-out shapes images;
- audio (mm-audio): the same for the description of held-out tones / chords;
- classify (mm-classify): macro-F1 of the multi-label head on held-out MM-IMDB-style records, for
  text + image and for the text-only and image-only ablations (`data.multimodal.ignore_modalities`);
- align (mm-align): retrieval recall@1 between held-out images and their (distinct) captions, mean
  of image -> text and text -> image.
The synthetic data is generated into a temporary cache; the runs go to a temporary folder (or
`--runs DIR` to keep them). Results: benchmarks/results/multimodal.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from finetune.recipe import load_recipe  # noqa: E402
from finetune.train import launch_training  # noqa: E402

TASKS = {"caption": "mm-caption", "audio": "mm-audio", "classify": "mm-classify", "align": "mm-align"}
QUICK = ["train.max_steps=2", "train.eval_every=null", "eval.max_examples=10", "data.max_eval_examples=10"]


def run(
    task: str, cache_dir: str, runs: Path, ignore: list[str] | None = None, extra: list[str] = ()
) -> dict:
    """Train one recipe through the training loop; its before / after task metrics from metrics.json."""
    path = ROOT / "recipes" / f"{TASKS[task]}.yaml"
    recipe = load_recipe(str(path))
    options = {**(recipe.data.multimodal or {}), "cache_dir": cache_dir, "ignore_modalities": ignore or []}
    name = task + "".join(f"-no-{m}" for m in ignore or [])
    started = time.perf_counter()
    result = launch_training(
        str(path),
        overrides=[f"data.multimodal={json.dumps(options)}", *extra],
        output_dir=runs / name,
        overwrite=True,
    )
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    names = [m for m in load_recipe(str(path), list(extra)).eval.metrics if m != "loss"]
    return {
        "recipe": f"recipes/{TASKS[task]}.yaml",
        "ignored_inputs": ignore or [],
        "before": {m: round(metrics[f"eval_{m}_before"], 4) for m in names},
        "after": {m: round(metrics[f"eval_{m}_after"], 4) for m in names},
        "eval_loss_before": metrics["eval_loss_before"],
        "eval_loss_after": metrics["eval_loss_after"],
        "steps": metrics["steps"],
        "train_seconds": round(metrics["train_seconds"], 1),
        "run_seconds": round(time.perf_counter() - started, 1),  # with data generation and the evals
        "trainable_params": metrics["trainable_params"],
    }


def markdown(results: dict) -> str:
    lines = ["| task | metric | before | after | steps | train s |", "| --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        for metric, value in r["after"].items():
            lines.append(
                f"| {name} | {metric} | {r['before'][metric]:.3f} | {value:.3f} | {r['steps']} | {r['train_seconds']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=[*TASKS, "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="smoke run: " + " ".join(QUICK))
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)"
    )
    parser.add_argument(
        "--runs", default=None, help="keep the run folders here (default: a temporary folder)"
    )
    parser.add_argument(
        "--output", default=None, help="results path without suffix (default: benchmarks/results/multimodal)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tasks = list(TASKS) if args.task == "all" else [args.task]
    quick_default = Path(tempfile.gettempdir()) / "multimodal-quick"
    default = quick_default if args.quick else ROOT / "benchmarks" / "results" / "multimodal"
    output = Path(args.output) if args.output else default
    results = (
        json.loads(output.with_suffix(".json").read_text()) if output.with_suffix(".json").exists() else {}
    )
    results.pop("_meta", None)
    extra = QUICK if args.quick else []
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as scratch:
        runs = Path(args.runs) if args.runs else Path(scratch)
        for task in tasks:
            results[task] = run(task, cache, runs, extra=extra)
            if task == "classify":
                results["classify-text-only"] = run(task, cache, runs, ["image"], extra=extra)
                results["classify-image-only"] = run(task, cache, runs, ["text"], extra=extra)
            print(markdown({k: v for k, v in results.items() if k.startswith(task)}), flush=True)
    meta = {
        "command": "python benchmarks/multimodal_evidence.py --task "
        + args.task
        + (" --quick" if args.quick else ""),
        "torch_threads": args.threads,
        "training": "finetune.train.launch_training (moetune train)",
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps({**results, "_meta": meta}, indent=2) + "\n")
    output.with_suffix(".md").write_text(markdown(results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
