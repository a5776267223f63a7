"""`moetune evaluate`: on a finished run's adapter and eval file it reproduces the run's final eval
loss and task metrics; on the base alone, the run's values before training."""

from __future__ import annotations

import json
import random

import pytest

import cli
from tests.helpers.runs import write_recipe


def write_qa(path, n: int, seed: int):
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            colour, shape = rng.choice(["red", "blue", "green"]), rng.choice(["circle", "square", "star"])
            fh.write(json.dumps({"prompt": f"{colour} {shape}", "response": f"{shape} {colour}"}) + "\n")
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    train, evals = write_qa(tmp / "train.jsonl", 32, seed=0), write_qa(tmp / "eval.jsonl", 7, seed=1)
    recipe = write_recipe(
        tmp,
        train,
        data={"eval": str(evals), "eval_fraction": None, "format": "instruction", "max_length": 32},
        train={"max_steps": 4, "save_every": None, "eval_batches": None},
        eval={"metrics": ["loss", "exact_match", "word_accuracy"], "max_new_tokens": 4},
    )
    assert cli.main(["train", str(recipe)]) == 0
    return tmp / "run", evals, json.loads((tmp / "run" / "metrics.json").read_text())


def evaluate(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert cli.main(["evaluate", "preset:tiny", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_evaluate_reproduces_the_runs_final_eval_loss_and_metrics(finished_run, capsys):
    run_dir, evals, metrics = finished_run
    metrics_flag = ["--metrics", "loss,exact_match,word_accuracy", "--max-new-tokens", "4"]
    after = evaluate(capsys, "--adapter", str(run_dir / "adapter"), "--data", str(evals), *metrics_flag)
    assert after["examples"] == 7
    assert after["values"]["loss"] == pytest.approx(metrics["eval_loss_after"], rel=1e-5)
    assert after["values"]["perplexity"] == pytest.approx(metrics["perplexity_after"], rel=1e-4)
    assert after["values"]["word_accuracy"] == pytest.approx(metrics["eval_word_accuracy_after"])
    assert after["values"]["exact_match"] == pytest.approx(metrics["eval_exact_match_after"])
    # The base alone, with the format given (no adapter recipe to read it from): the values before.
    before = evaluate(capsys, "--data", str(evals), "--format", "instruction", "--max-length", "32")
    assert before["values"]["loss"] == pytest.approx(metrics["eval_loss_before"], rel=1e-5)
    assert before["values"]["loss"] != pytest.approx(after["values"]["loss"])


def test_evaluate_prints_one_line_and_refuses_unknown_metrics(finished_run, capsys):
    run_dir, evals, metrics = finished_run
    assert (
        cli.main(["evaluate", "preset:tiny", "--adapter", str(run_dir / "adapter"), "--data", str(evals)])
        == 0
    )
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"preset:tiny + {run_dir / 'adapter'} on {evals} (7 examples): loss ")
    assert cli.main(["evaluate", "preset:tiny", "--data", str(evals), "--metrics", "loss,bleu"]) == 2
    assert "choose from loss, exact_match" in capsys.readouterr().err


def test_evaluate_reproduces_a_multimodal_runs_final_loss_and_macro_f1(tmp_path, capsys):
    """The run's held-out `synthetic:` set (its seed), its batch size (contrastive losses depend on it)."""
    run_dir = tmp_path / "run"
    short = [
        "--set",
        "train.max_steps=2",
        "--set",
        "train.eval_every=null",
        "--set",
        "data.max_eval_examples=40",
    ]
    assert cli.main(["train", "mm-classify", "--output", str(run_dir), *short]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    values = evaluate(
        capsys, "--adapter", str(run_dir / "adapter"), "--data", "synthetic:mmimdb:200", "--max-examples", "40",
        "--metrics", "loss,macro_f1",
    )["values"]  # fmt: skip
    assert values["loss"] == pytest.approx(metrics["eval_loss_after"], rel=1e-5)
    assert values["macro_f1"] == pytest.approx(metrics["eval_macro_f1_after"])
