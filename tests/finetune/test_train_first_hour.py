"""What a new user meets in the first hour of `moetune train`: overrides that win over the recipe,
defaults that are said out loud, a checkpoint at the end of every run, run folders that are never
silently reused, and bundled recipes that run from any folder."""

from __future__ import annotations

import json

import pytest
import yaml

import cli
from finetune.errors import MoetuneError
from finetune.train import TrainingRun, launch_training
from tests.helpers.runs import adapter_tensors, write_corpus, write_recipe


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data") / "train.jsonl", n=32)


def steps_run(monkeypatch) -> list[int]:
    """The optimizer steps run in this process from now on (filled in as they run)."""
    ran: list[int] = []
    real = TrainingRun.train_step

    def counting(self, micro_batches, step, load):
        ran.append(step)
        return real(self, micro_batches, step, load)

    monkeypatch.setattr(TrainingRun, "train_step", counting)
    return ran


def test_an_override_replaces_the_recipe_key_it_conflicts_with_and_the_run_says_so(tmp_path, corpus, capsys):
    recipe = write_recipe(
        tmp_path, corpus, data={"eval_fraction": None},
        train={"max_steps": None, "epochs": 2, "save_every": None, "eval_batches": None},
    )  # fmt: skip
    assert cli.main(["train", str(recipe), "--set", "train.max_steps=2"]) == 0
    err = capsys.readouterr().err
    assert "--set train.max_steps=2 replaces the recipe's train.epochs: 2 (the two cannot both be set)" in err
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 2


def test_a_minimal_recipe_trains_attention_and_experts_and_prints_the_defaults(
    tmp_path, corpus, capsys, caplog
):
    path = tmp_path / "minimal.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "preset:tiny"}, "data": {"train": str(corpus)}}))
    out = tmp_path / "run"
    assert cli.main(["train", str(path), "--output", str(out), "--set", "train.max_steps=1"]) == 0
    captured = capsys.readouterr()
    assert (
        "defaults used: adapter.targets=[attention, experts], adapter.r=16, adapter.alpha=32" in captured.out
    )
    assert "data.format not set; the records' fields (text) fit text" in caplog.text  # a warning on stderr
    report = captured.out  # the target report lists both groups
    assert "attention" in report and "experts" in report
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] and config["target_modules"]


def test_save_every_null_still_leaves_a_resumable_checkpoint_at_the_end(tmp_path, corpus, monkeypatch):
    recipe = write_recipe(
        tmp_path, corpus, data={"eval_fraction": None}, train={"max_steps": 3, "save_every": None}
    )
    launch_training(str(recipe))
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000003"]
    # continue the finished run for two more steps: only steps 4 and 5 run
    ran = steps_run(monkeypatch)
    launch_training(str(recipe), overrides=["train.max_steps=5"], resume=True)
    assert ran == [4, 5]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 5 and metrics["resumed_at"] == [3]


def test_save_every_beyond_the_run_means_a_checkpoint_at_the_end(tmp_path, corpus):
    recipe = write_recipe(
        tmp_path, corpus, data={"eval_fraction": None}, train={"max_steps": 2, "save_every": 100}
    )
    launch_training(str(recipe))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000002"]


def test_a_finished_run_is_replaced_only_with_overwrite(tmp_path, corpus, monkeypatch):
    recipe = write_recipe(
        tmp_path, corpus, data={"eval_fraction": None}, train={"max_steps": 2, "save_every": None}
    )
    launch_training(str(recipe))
    run = tmp_path / "run"
    (run / "notes.txt").write_text("mine")  # not a run output: never removed
    first = adapter_tensors(run)
    with pytest.raises(MoetuneError, match=r"holds a finished run.*pass --overwrite to replace it, --resume"):
        launch_training(str(recipe), overrides=["train.seed=1"])
    with pytest.raises(MoetuneError, match="--resume and --overwrite both given"):
        launch_training(str(recipe), resume=True, overwrite=True)
    # a start that fails (here: the data) leaves the earlier run as it was
    with pytest.raises(MoetuneError, match="no such file"):
        launch_training(str(recipe), overrides=["data.train=missing.jsonl"], overwrite=True)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]

    ran = steps_run(monkeypatch)
    launch_training(str(recipe), overrides=["train.seed=1", "train.max_steps=3"], overwrite=True)
    assert ran == [1, 2, 3]  # a new run from step 0, not a resume
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000003"]
    assert (run / "notes.txt").read_text() == "mine"
    second = adapter_tensors(run)
    assert any(not (second[k] == first[k]).all() for k in first)
    assert json.loads((run / "metrics.json").read_text())["steps"] == 3


def test_a_bundled_recipe_runs_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no recipes/data here
    args = [
        "train",
        "instruct",
        "--output",
        "run",
        "--set",
        "train.max_steps=1",
        "--set",
        "data.max_examples=16",
    ]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "data.train: recipes/data/instruct-sample.jsonl is read from the moetune installation" in out
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
