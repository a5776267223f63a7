"""`moetune train` on the multimodal recipes: prefix-aligned LM loss, encoder-only losses, label order."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

import cli

RECIPES = Path(cli.__file__).resolve().parent / "recipes"


def train(recipe: str, out: Path, *extra: str) -> dict:
    args = ["train", str(RECIPES / recipe), "--output", str(out), "--set", "train.max_steps=2", *extra]
    assert cli.main(args) == 0
    return json.loads((out / "metrics.json").read_text())


def test_caption_recipe_trains_the_decoder_on_text_after_the_modality_prefix(tmp_path):
    metrics = train("mm-caption.yaml", tmp_path / "run")
    assert (
        metrics["perplexity_before"] is not None and metrics["eval_loss_after"] < metrics["eval_loss_before"]
    )
    weights = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert any("encoders" in k or "projector" in k for k in weights)


def test_classify_recipe_trains_encoder_losses_and_keeps_the_label_order(tmp_path):
    metrics = train("mm-classify.yaml", tmp_path / "run")
    assert metrics["perplexity_before"] is None  # no text targets: no perplexity is claimed
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert all(torch.isfinite(torch.tensor(v)) for v in (metrics["train_loss"], metrics["eval_loss_after"]))
    adapter = tmp_path / "run" / "adapter"
    saved = json.loads(next(adapter.glob("*processor*config.json")).read_text())
    assert saved.get("label_names")
