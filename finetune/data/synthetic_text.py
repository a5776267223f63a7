"""Text data generated at run time, for recipes that must run anywhere: `synthetic:KIND[:N[:SEED]]`.

Kinds:
- `case-preference`: preference pairs (data.format: preference). The prompt asks for a few words in
  upper or in lower case ("Write in upper case: river stone apple"); the chosen answer has the case
  asked for, the rejected one the other case. Which case wins depends on the prompt, so a model must
  read the instruction: always preferring one case scores 50% reward accuracy.

Deterministic in (kind, N, SEED); records are built in memory (no files). Without N / SEED, data.train
draws 1000 records with seed 0 and data.eval 200 with seed 1, so held-out pairs are new draws.
"""

from __future__ import annotations

import random

import datasets

from finetune.data.synthetic_spec import parse_synthetic_spec

KINDS = ("case-preference",)
DEFAULT_SIZES = {"train": 1000, "eval": 200}
DEFAULT_SEEDS = {"train": 0, "eval": 1}
# Ten words a line (fmt: skip at the end): a vocabulary reads as a block, not as a column.
WORDS = (
    "apple", "river", "stone", "cloud", "green", "light", "house", "table", "water", "music",
    "paper", "glass", "night", "bread", "chair", "field", "plant", "storm", "train", "smile",
)  # fmt: skip


def parse_spec(spec: str) -> tuple[str, int | None, int | None]:
    """`synthetic:KIND[:N[:SEED]]` -> (KIND, N or None, SEED or None) for this module's KINDS."""
    return parse_synthetic_spec(spec, KINDS)


def case_preference(n: int, seed: int) -> list[dict[str, str]]:
    """`n` prompt / chosen / rejected records: the answer in the case the prompt asks for wins."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        words = " ".join(rng.sample(WORDS, rng.randint(2, 4)))
        upper = rng.random() < 0.5
        asked, other = (words.upper(), words) if upper else (words, words.upper())
        prompt = f"Write in {'upper' if upper else 'lower'} case: {words}\nAnswer: "
        records.append({"prompt": prompt, "chosen": asked, "rejected": other})
    return records


def synthetic_records(spec: str, *, what: str = "data.train") -> datasets.Dataset:
    """The records of a `synthetic:KIND[:N[:SEED]]` source; `what` (data.train / data.eval) picks the
    default size and seed."""
    kind, n, seed = parse_spec(spec)
    split = "eval" if what.endswith("eval") else "train"
    n = n if n is not None else DEFAULT_SIZES[split]
    seed = seed if seed is not None else DEFAULT_SEEDS[split]
    return datasets.Dataset.from_list(case_preference(n, seed))
