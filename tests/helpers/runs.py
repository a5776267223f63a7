"""Shared helpers of the training and fault tests: a small corpus, recipes, CLI subprocesses."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
WORDS = [
    "def",
    "class",
    "return",
    "import",
    "self",
    "value",
    "None",
    "True",
    "False",
    "for",
    "in",
    "range",
    "print",
    "if",
    "else",
    "while",
    "try",
    "except",
    "with",
    "as",
    "lambda",
    "yield",
    "pass",
    "break",
    "continue",
]

# Overrides that make a bundled recipe run in seconds (the README's `--set` examples).
SHORT = [
    "train.max_steps=8", "train.warmup_steps=2", "train.eval_every=4", "train.save_every=4",
    "train.eval_batches=2", "data.max_examples=12", "data.max_eval_examples=4",
]  # fmt: skip


def jsonl(path: Path, records) -> Path:
    """Write records (dicts, or strings written as they are: malformed lines) one per line."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def write_corpus(path: Path, n: int = 96, seed: int = 0) -> Path:
    """A jsonl of code-like lines with structure (so loss can fall quickly)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            lines = []
            for _ in range(rng.randint(2, 6)):
                name = rng.choice(["x", "y", "item", "total", "count"])
                lines.append(f"    {name} = {rng.choice(WORDS)}({name}, {rng.randint(0, 9)})")
            fh.write(json.dumps({"text": "def f():\n" + "\n".join(lines) + "\n    return x\n"}) + "\n")
    return path


def write_recipe(folder: Path, corpus: Path, **sections) -> Path:
    """A small recipe on preset:tiny; `sections` update the defaults section by section."""
    recipe = {
        "model": {"name": "preset:tiny"},
        "adapter": {"targets": ["attention", "experts"], "r": 4, "alpha": 8},
        "data": {"train": str(corpus), "eval_fraction": 0.2, "max_length": 48},
        "train": {
            "max_steps": 8, "batch_size": 4, "grad_accum": 1, "lr": 2.0e-3, "log_every": 2,
            "save_every": 4, "seed": 0, "eval_batches": 2,
        },
        "output": {"dir": str(folder / "run"), "keep_checkpoints": None},
    }  # fmt: skip
    for name, values in sections.items():
        recipe.setdefault(name, {}).update(values)  # a section the defaults leave out (eval)
    if recipe["data"].get("eval_fraction") is None and recipe["data"].get("eval") is None:
        recipe["train"].pop("eval_batches")  # no eval data: eval keys would be refused
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")])),
    )
    env.update(extra)
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "cli.py"), *args]


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        cli_command(*args), env=env or cli_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def adapter_tensors(run_dir: Path) -> dict:
    return load_file(str(Path(run_dir) / "adapter" / "adapter_model.safetensors"))


def history(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "history.json").read_text())
