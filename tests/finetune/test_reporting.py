"""What a run reports: the result read back from the run folder (what a launch of several processes
prints) is the one the run returned, and the log window averages what the steps reported."""

from __future__ import annotations

import math

from finetune.reporting import LogWindow, StepResult, TrainResult
from finetune.train import launch_training
from tests.helpers.runs import write_corpus, write_recipe


def test_the_result_read_from_the_run_folder_is_the_one_the_run_returned(tmp_path):
    corpus = write_corpus(tmp_path / "train.jsonl", n=24)
    recipe = write_recipe(tmp_path, corpus, train={"max_steps": 2, "save_every": None, "eval_batches": 1})
    result = launch_training(str(recipe))
    again = TrainResult.read(tmp_path / "run")
    assert again == result and str(again) == str(result)
    assert result.metrics.steps == 2 and result.adapter_dir == tmp_path / "run" / "adapter"
    assert str(result).splitlines()[0].startswith("trained 2 steps in ")


def test_the_log_window_skips_non_finite_losses_and_counts_tokens_per_second():
    window = LogWindow()
    window.add(StepResult(loss=2.0, aux_loss=0.1, grad_norm=1.0, tokens=100), seconds=1.0)
    window.add(StepResult(loss=float("nan"), aux_loss=0.3, grad_norm=3.0, tokens=300), seconds=1.0)
    logged = window.flush()
    assert logged["train/loss"] == 2.0 and math.isclose(logged["train/aux_loss"], 0.2)
    assert logged["train/grad_norm"] == 2.0 and logged["train/tokens_per_second"] == 200.0
    assert window.rows == []
