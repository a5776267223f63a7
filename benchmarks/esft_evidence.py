"""ESFT versus LoRA on all experts: held-out gain, retain loss and adapter size side by side.

    python benchmarks/esft_evidence.py            # full: writes benchmarks/results/esft.{json,md}
    python benchmarks/esft_evidence.py --quick    # a smoke run (3 steps, few records), writes under /tmp

The task is built at run time from files every installation has: the domain is moetune's own
documentation (docs/, Markdown: the `esft` recipe's data, 25% held out) and the retain set is a seeded
sample of this Python's standard library (`stdlib:python`), a different kind of text the adaptation
should not damage. Each configuration trains the `esft` recipe through `finetune.train.launch_training`
(the one training loop) with `data.retain` set, so the run itself measures:
- gain: held-out domain loss before - after (nats per token);
- retain loss change: retain loss after - before (what the adaptation cost elsewhere; the ESFT paper's
  claim is that ESFT keeps it smaller at a similar gain; this script reports what it measures);
- trainable parameters, the PEFT adapter file, and the per-expert export (`moetune export-adapter
  --format per-expert`: only experts that carry LoRA, so ESFT's is smaller).
Configurations: ESFT at two thresholds (`adapter.experts: {threshold: P}`, selected in the run on the
domain data) and LoRA on all experts (`adapter.experts: null`); same seed, steps and rank.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters.export import export_adapter  # noqa: E402
from finetune.train import launch_training  # noqa: E402

CONFIGS = {
    "esft-0.2": ["adapter.experts={threshold: 0.2}"],
    "esft-0.5": ["adapter.experts={threshold: 0.5}"],
    "all-experts": ["adapter.experts=null"],
}
COMMON = ["data.retain=stdlib:python", "data.max_eval_examples=40", "train.eval_batches=8"]
QUICK = [
    "train.epochs=null",
    "train.max_steps=3",
    "data.max_examples=12",
    "data.max_eval_examples=4",
    "train.eval_batches=2",
]


def run(name: str, overrides: list[str], runs: Path) -> dict:
    run_dir = runs / name
    result = launch_training("esft", overrides=overrides, output_dir=run_dir, overwrite=True)
    m = json.loads((result.run_dir / "metrics.json").read_text())
    export_adapter(run_dir / "adapter", run_dir / "per-expert", fmt="per-expert")
    return {
        "overrides": overrides,
        "gain": m["eval_loss_before"] - m["eval_loss_after"],
        "eval_loss_before": m["eval_loss_before"],
        "eval_loss_after": m["eval_loss_after"],
        "retain_loss_before": m["retain_loss_before"],
        "retain_loss_after": m["retain_loss_after"],
        "retain_loss_change": m["retain_loss_after"] - m["retain_loss_before"],
        "trainable_params": m["trainable_params"],
        "adapter_bytes": (run_dir / "adapter" / "adapter_model.safetensors").stat().st_size,
        "per_expert_bytes": (run_dir / "per-expert" / "adapter_model.safetensors").stat().st_size,
        "steps": m["steps"],
        "train_seconds": round(m["train_seconds"], 1),
    }


def markdown(results: dict) -> str:
    lines = [
        "| configuration | trainable | gain (held-out) | retain loss change | PEFT file | per-expert export |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['trainable_params']:,} | {r['gain']:.4f} | {r['retain_loss_change']:+.4f} | "
            f"{r['adapter_bytes'] / 1024:.0f} KiB | {r['per_expert_bytes'] / 1024:.0f} KiB |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: " + " ".join(QUICK))
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)"
    )
    parser.add_argument(
        "--runs", default=None, help="keep the run folders here (default: a temporary folder)"
    )
    parser.add_argument(
        "--output", default=None, help="results path without suffix (default: benchmarks/results/esft)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    default = (
        Path(tempfile.gettempdir()) / "esft-quick" if args.quick else ROOT / "benchmarks" / "results" / "esft"
    )
    output = Path(args.output) if args.output else default
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        runs = Path(args.runs) if args.runs else Path(scratch)
        for name, overrides in CONFIGS.items():
            results[name] = run(name, [*COMMON, *overrides, *(QUICK if args.quick else [])], runs)
            print(markdown({name: results[name]}).splitlines()[-1], flush=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python benchmarks/esft_evidence.py" + (" --quick" if args.quick else ""),
        "torch_threads": args.threads,
    }
    output.with_suffix(".json").write_text(json.dumps({**results, "_meta": meta}, indent=2) + "\n")
    output.with_suffix(".md").write_text(markdown(results) + "\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
