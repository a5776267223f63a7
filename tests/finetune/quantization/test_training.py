"""`model.quantize` through the training loop: one process, two DDP processes, resume, and the
adapter's next steps (plain PEFT on the float base, moetune on the quantized base)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import PeftModel

from adapters import load_adapter
from finetune.loading import init_model, load_model
from finetune.train import launch_training
from tests.helpers.models import random_batch
from tests.helpers.runs import adapter_tensors, history, write_corpus, write_recipe


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quantized")
    corpus = write_corpus(folder / "train.jsonl", n=64)
    base = init_model(
        "tiny", folder / "base"
    ).folder  # a float folder with its tokenizer: quantized while it loads
    return folder, corpus, base


def test_quantized_run_trains_and_its_adapter_serves_the_float_and_the_quantized_base(setup):
    folder, corpus, base = setup
    recipe = write_recipe(
        folder, corpus, model={"name": str(base), "quantize": "nf4"}, train={"max_steps": 6, "save_every": 3}
    )
    launch_training(str(recipe), output_dir=folder / "nf4")
    run = folder / "nf4"
    losses = [loss for _, loss in history(run)["train_loss"]]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    saved = adapter_tensors(run)
    assert any("experts" in key for key in saved)
    assert (run / "plots" / "expert_load.png").is_file()  # routing is recorded through quantized experts too

    batch = random_batch(length=12)
    float_model, _ = load_model(str(base))
    with warnings.catch_warnings():  # peft calls transformers' deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        plain = PeftModel.from_pretrained(float_model, str(run / "adapter"))  # plain PEFT, float base
    for name, param in plain.named_parameters():
        if "lora_" in name:
            key = name.replace(".default", "")
            assert torch.equal(param, saved[key]), key
    quantized, _ = load_model(str(base), quantize="nf4")
    with torch.no_grad():
        on_float = plain(**batch).logits
        on_quantized = load_adapter(quantized, run / "adapter")(**batch).logits
    assert torch.isfinite(on_quantized).all()
    assert (on_float - on_quantized).abs().mean() < 0.1 * on_float.abs().mean()  # NF4 rounding only


def test_resume_of_a_quantized_run_gives_the_same_adapter(setup, monkeypatch):
    """Stopped after step 3 (SIGTERM at a fixed step: a checkpoint is written), resumed: the same adapter."""
    import cli

    folder, corpus, base = setup
    recipe = write_recipe(
        folder, corpus, model={"name": str(base), "quantize": "int8"}, train={"max_steps": 5, "save_every": 2}
    )
    launch_training(str(recipe), output_dir=folder / "whole")
    monkeypatch.setenv("MOETUNE_FAILPOINT", "after-step@3:SIGTERM")
    assert cli.main(["train", str(recipe), "--output", str(folder / "parts")]) == 143
    monkeypatch.delenv("MOETUNE_FAILPOINT")
    launch_training(str(recipe), output_dir=folder / "parts", resume=True)
    metrics = json.loads((folder / "parts" / "metrics.json").read_text())
    assert metrics["resumed_at"] == [3]  # the resumed process ran steps 4-5 only
    whole, parts = adapter_tensors(folder / "whole"), adapter_tensors(folder / "parts")
    assert whole.keys() == parts.keys()
    for key, value in whole.items():
        assert torch.equal(value, parts[key]), key


def test_two_ddp_processes_train_a_quantized_model_like_one(setup):
    folder, corpus, base = setup
    train = {"max_steps": 2, "batch_size": 2, "grad_accum": 1, "save_every": 2, "eval_batches": 2}
    recipe = write_recipe(folder, corpus, model={"name": str(base), "quantize": "nf4"}, train=train)
    launch_training(str(recipe), output_dir=folder / "one", overrides=["train.grad_accum=2"])
    launch_training(str(recipe), output_dir=folder / "two", num_processes=2)
    one, two = history(folder / "one")["train_loss"], history(folder / "two")["train_loss"]
    assert [s for s, _ in one] == [s for s, _ in two] == [1, 2]
    for (_, a), (_, b) in zip(one, two):
        assert a == pytest.approx(b, abs=1e-3)
    for key, value in adapter_tensors(folder / "one").items():
        assert (adapter_tensors(folder / "two")[key] - value).abs().max() < 1e-4, key
