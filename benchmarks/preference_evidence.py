"""Evidence that preference training works: recipes/preference.yaml with each train.method, before / after.

    python benchmarks/preference_evidence.py            # dpo, orpo, simpo: the recipe as shipped
    python benchmarks/preference_evidence.py --quick    # a few steps on a few pairs: checks the script only

Each method trains the bundled recipe through the real training loop (`launch_training`: data built at run
time from `synthetic:case-preference`, 1000 training pairs, 200 new held-out pairs) and reports, on the
held-out pairs:
- reward accuracy before / after, as the run logs it (DPO's before is 0: the policy starts equal to its
  reference, so every reward is 0 and no pair is strictly preferred);
- log-prob preference: the share of pairs whose chosen answer has the higher summed log-probability,
  under the base model and under base + adapter (a reference-free view of the same question);
- the SFT loss of the chosen answers before / after (does the preference cost likelihood?);
- steps and training seconds.
Results go to benchmarks/results/preference.json and .md (--quick writes preference-quick.*, not numbers
to quote).
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

from finetune.train import launch_training  # noqa: E402

METHODS = {"dpo": [], "orpo": ["train.preference={lambda: 1.0}"], "simpo": ["train.preference=null"]}
QUICK = ["train.max_steps=6", "train.eval_every=3", "data.max_examples=48", "data.max_eval_examples=16"]


@torch.no_grad()
def logprob_preference(run_dir: Path) -> tuple[float, float]:
    """(share of held-out pairs the base prefers by summed log-prob, the same with the adapter)."""
    from adapters import load_adapter
    from finetune.data import build_datasets, make_collator
    from finetune.loading import load_model
    from finetune.losses import PairLogps
    from finetune.recipe import load_recipe

    recipe = load_recipe(str(run_dir / "adapter" / "recipe.yaml"))
    model, tok = load_model(recipe.model.name)
    _, held_out = build_datasets(recipe.data, tok, seed=recipe.train.seed)
    collate = make_collator(recipe.data, tok)
    batches = [
        collate([held_out[j] for j in range(i, min(i + 16, len(held_out)))])
        for i in range(0, len(held_out), 16)
    ]

    def share(m: torch.nn.Module) -> float:
        wins = 0
        for batch in batches:
            logps = PairLogps.of(
                m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                batch["labels"],
            )
            wins += int((logps.chosen > logps.rejected).sum())
        return wins / len(held_out)

    before = share(model.eval())
    return before, share(load_adapter(model, run_dir / "adapter").eval())


def run(method: str, extra: list[str], out: Path) -> dict:
    result = launch_training(
        "preference", overrides=[f"train.method={method}", *extra], output_dir=out / method
    )
    m = result.metrics
    base, adapted = logprob_preference(out / method)
    return {
        "method": method,
        "overrides": extra,
        "steps": m.steps,
        "train_seconds": round(m.train_seconds, 1),
        "reward_accuracy_before": m.reward_accuracy_before,
        "reward_accuracy_after": m.reward_accuracy_after,
        "reward_margin_before": m.reward_margin_before,
        "reward_margin_after": m.reward_margin_after,
        "logprob_preference_before": base,
        "logprob_preference_after": adapted,
        "chosen_sft_loss_before": m.eval_loss_before,
        "chosen_sft_loss_after": m.eval_loss_after,
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| method | reward acc. before | after | log-prob pref. before | after | chosen SFT loss before | after | steps | train s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['reward_accuracy_before']:.3f} | {r['reward_accuracy_after']:.3f} | "
            f"{r['logprob_preference_before']:.3f} | {r['logprob_preference_after']:.3f} | "
            f"{r['chosen_sft_loss_before']:.3f} | {r['chosen_sft_loss_after']:.3f} | {r['steps']} | {r['train_seconds']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps: check that the script runs")
    parser.add_argument("--method", choices=sorted(METHODS), action="append", help="default: all")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.method or list(METHODS):
            rows.append(run(method, METHODS[method] + (QUICK if args.quick else []), Path(tmp)))
    name = "preference-quick" if args.quick else "preference"
    results = ROOT / "benchmarks" / "results"
    (results / f"{name}.json").write_text(json.dumps({"quick": args.quick, "rows": rows}, indent=2) + "\n")
    (results / f"{name}.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
