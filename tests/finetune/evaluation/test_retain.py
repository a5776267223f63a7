"""`data.retain`: a general-domain set whose loss before and after training shows what the adaptation
cost elsewhere (retain_loss_before / _after in metrics.json, history, TensorBoard and the summary)."""

from __future__ import annotations

import json
import random

import pytest

from finetune.errors import MoetuneError
from finetune.evaluation.command import evaluate_model
from finetune.recipe import load_recipe
from finetune.train import launch_training
from tests.helpers.runs import write_corpus, write_recipe


def write_qa(path, n: int):
    rng = random.Random(0)
    with open(path, "w") as fh:
        for _ in range(n):
            colour, shape = rng.choice(["red", "blue"]), rng.choice(["circle", "star"])
            fh.write(json.dumps({"prompt": f"{colour} {shape}", "response": f"{shape} {colour}"}) + "\n")
    return path


def test_retain_loss_before_and_after_is_the_loss_of_the_base_and_of_the_adapter(tmp_path):
    retain = write_corpus(tmp_path / "general.jsonl", n=6, seed=3)  # code text, another domain and format
    recipe = write_recipe(
        tmp_path,
        write_qa(tmp_path / "qa.jsonl", 24),
        data={"eval_fraction": None, "format": "instruction", "retain": str(retain), "max_length": 48},
        train={"max_steps": 4, "eval_every": 2, "save_every": None, "eval_batches": None},
    )
    result = launch_training(str(recipe))
    run_dir = tmp_path / "run"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (
        "eval_loss_before" in metrics and metrics["eval_loss_before"] is None
    )  # no held-out set: retain only
    history = json.loads((run_dir / "history.json").read_text())["eval_metrics"]["retain/loss"]
    assert [step for step, _ in history] == [2, 4] and history[-1][1] == metrics["retain_loss_after"]
    line = (
        f"retain loss (data.retain) {metrics['retain_loss_before']:.4f} -> {metrics['retain_loss_after']:.4f}"
    )
    assert line in str(result)
    # The same numbers from the base alone and from the adapter, evaluated on the retain file as text.
    base = evaluate_model("preset:tiny", str(retain), format="text", max_length=48)
    tuned = evaluate_model("preset:tiny", str(retain), adapter=str(run_dir / "adapter"), format="text")
    assert base.values["loss"] == pytest.approx(metrics["retain_loss_before"], rel=1e-5)
    assert tuned.values["loss"] == pytest.approx(metrics["retain_loss_after"], rel=1e-5)
    assert metrics["retain_loss_after"] != pytest.approx(metrics["retain_loss_before"])


def test_retain_errors_name_data_retain(tmp_path):
    recipe = write_recipe(
        tmp_path, write_corpus(tmp_path / "t.jsonl", n=8), data={"retain": str(tmp_path / "nope.jsonl")}
    )
    with pytest.raises(MoetuneError, match="data.retain"):
        launch_training(str(recipe))
    with pytest.raises(MoetuneError, match="no eval data"):  # eval keys without eval or retain data
        load_recipe(str(recipe), ["data.retain=null", "data.eval_fraction=null", "train.eval_every=2"])
