"""A training run measures `eval.metrics` before, at every eval_every and after, and reports them
everywhere a run reports: metrics.json, history.json, TensorBoard, plots, the model card, the summary."""

from __future__ import annotations

import json
import random

import pytest
import yaml

from finetune.errors import MoetuneError
from finetune.recipe import load_recipe
from finetune.train import launch_training
from tests.helpers.runs import write_recipe

SHAPES, COLOURS = ["circle", "square", "star"], ["red", "blue", "green"]


def write_qa(path, n: int, seed: int = 0):
    """Instruction records whose answer follows from the prompt (colour shape -> shape colour)."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)
            fh.write(json.dumps({"prompt": f"{colour} {shape}", "response": f"{shape} {colour}"}) + "\n")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("eval-run")
    train, evals = write_qa(tmp_path / "train.jsonl", 32), write_qa(tmp_path / "eval.jsonl", 6, seed=1)
    recipe = write_recipe(
        tmp_path,
        train,
        data={"eval": str(evals), "eval_fraction": None, "format": "instruction", "max_length": 32},
        train={"max_steps": 4, "eval_every": 2, "save_every": None, "eval_batches": None},
        eval={"metrics": ["loss", "exact_match", "word_accuracy"], "batch_size": 3, "max_examples": 5,
              "max_new_tokens": 4},
    )  # fmt: skip
    result = launch_training(str(recipe))
    return tmp_path / "run", result


def test_task_metrics_before_during_and_after_reach_every_report(run):
    run_dir, result = run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for name in ("exact_match", "word_accuracy"):
        for when in ("before", "after"):
            assert 0.0 <= metrics[f"eval_{name}_{when}"] <= 1.0
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    history = json.loads((run_dir / "history.json").read_text())
    assert [step for step, _ in history["eval_metrics"]["eval/exact_match"]] == [2, 4]
    assert history["eval_metrics"]["eval/word_accuracy"][-1][1] == metrics["eval_word_accuracy_after"]
    assert json.loads((run_dir / "adapter" / "metrics.json").read_text()) == metrics

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((run_dir / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    logged = events.Scalars("eval/exact_match")
    assert [e.step for e in logged] == [0, 2, 4]

    card = (run_dir / "adapter" / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    results = {m["name"]: m["value"] for m in header["model-index"][0]["results"][0]["metrics"]}
    assert results["eval_word_accuracy_after"] == pytest.approx(metrics["eval_word_accuracy_after"])
    summary = str(result)
    assert f"eval word_accuracy {metrics['eval_word_accuracy_before']:.4f} -> " in summary
    assert (run_dir / "plots" / "loss.png").is_file()


def test_task_metrics_without_eval_data_or_with_packing_are_refused(tmp_path):
    recipe = write_recipe(tmp_path, write_qa(tmp_path / "t.jsonl", 4), data={"eval_fraction": None})
    with pytest.raises(MoetuneError, match=r"eval.metrics \[exact_match\] need eval data"):
        load_recipe(str(recipe), ["eval.metrics=[loss, exact_match]"])
    with pytest.raises(MoetuneError, match="set data.packing: false"):
        load_recipe(
            str(recipe), ["eval.metrics=[word_accuracy]", "data.eval_fraction=0.5", "data.packing=true"]
        )
    with pytest.raises(MoetuneError, match="eval.metrics"):
        load_recipe(str(recipe), ["eval.metrics=[bleu]"])


def test_metrics_json_round_trip_keeps_the_task_metrics_for_the_summary(run):
    """A launch of several processes prints the summary from metrics.json (TrainResult.read)."""
    from finetune.reporting import TrainResult

    run_dir, result = run
    again = TrainResult.read(run_dir)
    assert again.metrics.as_dict() == result.metrics.as_dict()
    assert str(again) == str(result)
