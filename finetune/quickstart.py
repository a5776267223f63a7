"""`python -m finetune.quickstart` (what `make quickstart` runs): the whole job, end to end, on a CPU.

1. init      a random `tiny` built-in MoE model and its tokenizer, written to disk
2. train     the bundled `quickstart` recipe: LoRA on attention + routed experts, on a code corpus
             built at run time from this Python's standard library sources
3. evaluate  held-out perplexity before and after (the recipe measures both; it must drop)
4. merge     fold the adapter into the base, then verify the merged model against base + adapter
5. stage     a hub upload of the adapter with `push --dry-run` (lists and validates, uploads nothing)

Every artefact's path is printed at the end. Offline, on a CPU; the time and the perplexities it
prints are the ones the README quotes, stored by `--record` (benchmarks/results/quickstart.txt:
32 s; perplexity 1037.83 -> 347.78 on 2026-11-29).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from finetune.errors import MoetuneError

DEFAULT_OUTPUT = Path("runs") / "quickstart"
STAGED_REPO = "your-name/moetune-quickstart-lora"


def run_quickstart(output: str | Path | None = None, overrides: Sequence[str] = ()) -> str:
    """Run the five steps into `output` (default runs/quickstart, or the next free runs/quickstart-N)."""
    import json

    from adapters.hub import push_folder
    from adapters.merge import merge_into_base, verify_merge
    from finetune.loading import init_model
    from finetune.train import launch_training

    out = _output_folder(output)
    started = time.perf_counter()
    base, run, merged = out / "base-model", out / "run", out / "merged"

    _say(f"[1/5] init: random `tiny` MoE model + tokenizer -> {base}")
    init_model("tiny", base, seed=0)

    settings = [f"model.name={base}", *overrides]
    _say(
        f"[2/5] train: recipe `quickstart` (code from the standard library) with --set {' --set '.join(settings)}"
    )
    result = launch_training("quickstart", overrides=settings, output_dir=run)
    metrics = json.loads((run / "metrics.json").read_text())

    _say("[3/5] evaluate: held-out perplexity before -> after")
    before, after = metrics["perplexity_before"], metrics["perplexity_after"]
    if not after < before:
        raise MoetuneError(
            f"quickstart: held-out perplexity did not drop ({before:.2f} -> {after:.2f}); "
            f"see {run / 'plots' / 'loss.png'}"
        )
    drop = 100.0 * (1.0 - after / before)

    _say(f"[4/5] merge: adapter folded into the base -> {merged}, then verified")
    merge_report = merge_into_base(base, run / "adapter", merged)
    verify_report = verify_merge(base, run / "adapter", merged)

    _say(f"[5/5] stage: push --dry-run of the adapter to {STAGED_REPO}")
    push_report = push_folder(run / "adapter", STAGED_REPO, private=False, revision=None, dry_run=True)

    seconds = time.perf_counter() - started
    lines = [
        "",
        str(result),
        "",
        f"merge: {merge_report}",
        f"verify: {verify_report}",
        f"push --dry-run: {push_report}",
        "",
        f"quickstart done in {seconds:.0f} s (wall, all five steps): held-out perplexity {before:.2f} -> "
        f"{after:.2f} ({drop:.1f}% lower)",
        "artefacts:",
        f"  base model        {base}",
        f"  adapter (PEFT)    {run / 'adapter'}   (model card: README.md, recipe.yaml, metrics.json)",
        f"  metrics           {run / 'metrics.json'}",
        f"  plots             {run / 'plots'}   (loss.png, expert_load.png)",
        f"  TensorBoard logs  {run / 'logs'}   (tensorboard --logdir {run / 'logs'})",
        f"  checkpoints       {run / 'checkpoints'}",
        f"  resolved recipe   {run / 'recipe.yaml'}",
        f"  merged model      {merged}",
        f"next: moetune generate {merged} --prompt 'def '   |   "
        f"moetune push {run / 'adapter'} --repo-id YOU/NAME",
    ]
    return "\n".join(lines)


def record_run(path: str | Path, report: str, argv: Sequence[str]) -> Path:
    """Store the quickstart's report with what it ran on, so a quoted time or perplexity has a source."""
    import datetime

    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    header = [
        f"# python -m finetune.quickstart {' '.join(argv)}",
        f"# date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"# machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
        + (f", load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}" if load else ""),
        f"# python {platform.python_version()}, torch {torch.__version__}",
    ]
    path.write_text("\n".join(header) + "\n" + report.lstrip("\n") + "\n", encoding="utf-8")
    return path


def _output_folder(output: str | Path | None) -> Path:
    """The folder to fill: the one asked for (must be new or empty), or the next free default."""
    if output is not None:
        out = Path(output)
        if out.exists() and any(out.iterdir()):
            raise MoetuneError(
                f"quickstart: {out} is not empty; pass a new --output folder (nothing was written)"
            )
        return out
    out, n = DEFAULT_OUTPUT, 1
    while out.exists() and any(out.iterdir()):
        n += 1
        out = DEFAULT_OUTPUT.with_name(f"{DEFAULT_OUTPUT.name}-{n}")
    if n > 1:
        _say(f"{DEFAULT_OUTPUT} exists from an earlier run; writing to {out}")
    return out


def _say(text: str) -> None:
    print(text, flush=True)


def _one_thread_unless_told() -> None:
    """The tiny model is dominated by per-op overhead: one torch thread is faster than two on a 2-core
    CPU (measured 4.9k-10.3k vs 0.5k-1.1k tokens/s on the shared CI-size machine); OMP_NUM_THREADS wins."""
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m finetune.quickstart", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--output", default=None, help=f"folder for everything (default {DEFAULT_OUTPUT})")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key"
    )
    parser.add_argument(
        "--record", default=None, metavar="FILE", help="also write the report, with date and machine, to FILE"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    args = parser.parse_args(argv)
    _one_thread_unless_told()
    try:
        report = run_quickstart(args.output, args.set)
        print(report)
        if args.record:
            print(f"recorded in {record_run(args.record, report, sys.argv[1:] if argv is None else argv)}")
    except MoetuneError as err:
        if args.debug:
            raise
        print(f"moetune: error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
