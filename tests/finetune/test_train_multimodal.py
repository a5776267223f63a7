"""`moetune train` on the multimodal recipes: the training loss lines up with the text after the
modality prefix, encoder-only losses, label order."""

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
    metrics = train("mm-caption.yaml", tmp_path / "run", "--set", "eval.max_examples=10")
    assert (
        metrics["perplexity_before"] is not None and metrics["eval_loss_after"] < metrics["eval_loss_before"]
    )
    assert {"eval_exact_match_before", "eval_word_accuracy_after"} <= set(
        metrics
    )  # the recipe's eval.metrics
    weights = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert any("encoders" in k or "projector" in k for k in weights)


def test_classify_recipe_trains_encoder_losses_and_keeps_the_label_order(tmp_path):
    metrics = train("mm-classify.yaml", tmp_path / "run")
    assert metrics["perplexity_before"] is None  # no text targets: no perplexity is claimed
    assert 0.0 <= metrics["eval_macro_f1_before"] <= 1.0 and 0.0 <= metrics["eval_macro_f1_after"] <= 1.0
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert all(torch.isfinite(torch.tensor(v)) for v in (metrics["train_loss"], metrics["eval_loss_after"]))
    adapter = tmp_path / "run" / "adapter"
    saved = json.loads(next(adapter.glob("*processor*config.json")).read_text())
    assert saved.get("label_names")


def test_the_training_loss_takes_the_text_positions_after_the_modality_prefix(tmp_path):
    """The loop computes the LM loss itself from the logits' last T positions (T = text length); it
    must equal the model's own lm_loss, which aligns labels behind the prefix slots explicitly."""
    from finetune.data import make_collator, prepare_datasets
    from finetune.loading import load_model
    from finetune.losses import count_label_tokens, forward_loss
    from finetune.recipe import load_recipe

    recipe = load_recipe(str(RECIPES / "mm-caption.yaml"))
    data = recipe.data
    data.train, data.eval = "synthetic:shapes-caption:8", None
    data.multimodal = {**(data.multimodal or {}), "cache_dir": str(tmp_path)}
    torch.manual_seed(0)
    model, processor = load_model(recipe.model.name, modalities=recipe.model.modalities)
    prepared = prepare_datasets(data, processor, seed=0)
    batch = make_collator(data, processor)([prepared.train[i] for i in range(4)])
    model.eval()
    with torch.no_grad():
        out = model(**batch)
        assert out.prefix_length > 0 and out.logits.shape[1] == out.prefix_length + batch["labels"].shape[1]
        mine = forward_loss(model, batch, routes=False).loss_sum / count_label_tokens(batch["labels"])
    torch.testing.assert_close(mine, out.lm_loss.float(), rtol=1e-5, atol=1e-6)
    # the same loss taken on the first T positions (the prefix slots) is far off: the check can fail
    logits = out.logits[:, : batch["labels"].shape[1]][:, :-1].float()
    wrong = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
    )
    assert abs(float(wrong) - float(out.lm_loss)) > 1e-3
