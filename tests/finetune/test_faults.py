"""Faults during training: kill -9 and resume, Ctrl-C / SIGTERM and resume, kills in the middle of
writes, a full disk, NaN/inf, and the hub token never reaching a file.

The signals are real: a `moetune train` subprocess sends itself SIGKILL or SIGINT at an exact,
fixed point (MOETUNE_FAILPOINT, see finetune/checkpoint.py: after a given step, halfway through a
checkpoint or the adapter), which no polling from outside can hit reliably. The resumed adapter is
compared tensor by tensor with an uninterrupted run of the same recipe: on a CPU every kernel the
tiny model uses is deterministic, so they must be identical (torch.equal). Because the run is
deterministic, a silent restart from step 0 would give the same adapter: every resume also counts
the steps the resumed process ran and checks they are exactly the missing ones.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from finetune import checkpoint as ckpt
from finetune.errors import MoetuneError
from finetune.train import TrainingRun, launch_training
from tests.helpers.runs import adapter_tensors, cli_env, run_cli, write_corpus, write_recipe

STEPS = 12
KILL_AT = 7  # between the checkpoints of steps 6 and 8: the resumed run must replay step 7


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """One recipe (12 steps, a checkpoint every 2) and the adapter of its uninterrupted run."""
    folder = tmp_path_factory.mktemp("faults")
    corpus = write_corpus(folder / "train.jsonl")
    recipe = write_recipe(
        folder,
        corpus,
        data={"eval_fraction": None},
        adapter={"dropout": 0.1, "targets": ["attention"]},  # dropout: the RNG must be restored too
        train={"max_steps": STEPS, "save_every": 2, "log_every": 1},
    )
    launch_training(str(recipe), output_dir=folder / "reference")
    return recipe, adapter_tensors(folder / "reference")


def assert_same_adapter(run_dir, reference):
    resumed = adapter_tensors(run_dir)
    assert resumed.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(resumed[key], value), f"{key} differs after resume"


def resume_counting_steps(monkeypatch, recipe, run_dir) -> list[int]:
    """Resume `run_dir` in this process through the CLI; returns the steps this process ran."""
    import cli

    ran = []
    real = TrainingRun.train_step

    def counting(self, micro_batches, step, load):
        ran.append(step)
        return real(self, micro_batches, step, load)

    monkeypatch.setattr(TrainingRun, "train_step", counting)
    assert cli.main(["train", str(recipe), "--output", str(run_dir), "--resume"]) == 0
    return ran


def test_kill_9_at_a_fixed_step_then_resume_runs_only_the_rest_and_gives_the_same_adapter(
    tmp_path, setup, monkeypatch
):
    recipe, reference = setup
    run_dir = tmp_path / "run"
    done = run_cli(
        "train", str(recipe), "--output", str(run_dir), env=cli_env(MOETUNE_FAILPOINT=f"after-step@{KILL_AT}")
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert not (run_dir / "adapter").exists()
    last = ckpt.latest_checkpoint(run_dir)
    assert ckpt.read_trainer_state(last)["step"] == KILL_AT - 1  # step 7 ran but was never saved

    assert resume_counting_steps(monkeypatch, recipe, run_dir) == list(range(KILL_AT, STEPS + 1))
    assert_same_adapter(run_dir, reference)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == STEPS and metrics["resumed_at"] == [KILL_AT - 1]


def interrupted_message(how: str, run_dir) -> str:
    return (
        f"moetune: error: training interrupted by {how} after step 5 of {STEPS}; checkpoint saved in "
        f"{run_dir / 'checkpoints' / 'step-000005'}; rerun the same command with --resume to continue"
    )


def check_interrupted_run(run_dir) -> None:
    assert not (run_dir / "adapter").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step-000002",
        "step-000004",
        "step-000005",
    ]
    assert ckpt.read_trainer_state(run_dir / "checkpoints" / "step-000005")["step"] == 5


def test_ctrl_c_saves_a_checkpoint_and_resume_continues_exactly(tmp_path, setup, monkeypatch):
    """SIGINT lands after step 5 (no checkpoint due there) in a real process: the run finishes that
    step, saves it atomically, says how to continue, exits 130; --resume runs steps 6..12 only."""
    recipe, reference = setup
    run_dir = tmp_path / "run"
    env = cli_env(MOETUNE_FAILPOINT="after-step@5:SIGINT")
    done = run_cli("train", str(recipe), "--output", str(run_dir), env=env)
    assert done.returncode == 130, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("moetune: error:")]
    assert errors == [interrupted_message("SIGINT", run_dir)]
    check_interrupted_run(run_dir)

    assert resume_counting_steps(monkeypatch, recipe, run_dir) == list(range(6, STEPS + 1))
    assert_same_adapter(run_dir, reference)


def test_sigterm_is_handled_like_ctrl_c(tmp_path, setup, monkeypatch, capsys):
    """The same through SIGTERM (what schedulers and `kill` send), in this process: exit code 143."""
    import cli

    recipe, _ = setup
    run_dir = tmp_path / "run"
    monkeypatch.setenv("MOETUNE_FAILPOINT", "after-step@5:SIGTERM")
    assert cli.main(["train", str(recipe), "--output", str(run_dir)]) == 128 + signal.SIGTERM
    assert interrupted_message("SIGTERM", run_dir) in capsys.readouterr().err
    check_interrupted_run(run_dir)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler was put back


def test_kill_during_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, setup, monkeypatch):
    recipe, reference = setup
    run_dir = tmp_path / "run"
    done = run_cli(
        "train",
        str(recipe),
        "--output",
        str(run_dir),
        env=cli_env(MOETUNE_FAILPOINT="checkpoint-mid-write@4"),
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]

    folder = run_dir / "checkpoints"
    assert (folder / ".tmp-step-000004").is_dir()  # the write that was cut short
    assert not (folder / "step-000004").exists()
    last = ckpt.latest_checkpoint(run_dir)
    assert last == folder / "step-000002"
    assert ckpt.read_trainer_state(last)["step"] == 2
    assert load_file(str(last / "model.safetensors"))  # intact and loadable

    assert resume_counting_steps(monkeypatch, recipe, run_dir) == list(range(3, STEPS + 1))
    assert not (folder / ".tmp-step-000004").exists()  # cleaned on resume
    assert_same_adapter(run_dir, reference)


def test_kill_during_the_adapter_write_leaves_no_half_adapter(tmp_path, setup, monkeypatch):
    recipe, reference = setup
    run_dir = tmp_path / "run"
    done = run_cli(
        "train", str(recipe), "--output", str(run_dir), env=cli_env(MOETUNE_FAILPOINT="adapter-mid-write")
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert not (run_dir / "adapter").exists()
    assert (run_dir / ".tmp-adapter" / "adapter_model.safetensors").exists()  # it was being written
    assert ckpt.read_trainer_state(ckpt.latest_checkpoint(run_dir))["step"] == STEPS  # saved at the end

    assert resume_counting_steps(monkeypatch, recipe, run_dir) == []  # only the adapter is left to write
    assert not (run_dir / ".tmp-adapter").exists()
    assert_same_adapter(run_dir, reference)


def test_an_adapter_is_replaced_whole_or_not_at_all(tmp_path):
    final = tmp_path / "adapter"
    with ckpt.atomic_folder(final) as tmp:
        (tmp / "weights").write_text("old")
    with pytest.raises(RuntimeError), ckpt.atomic_folder(final) as tmp:
        (tmp / "weights").write_text("new, half written")
        raise RuntimeError("crash")
    assert (final / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    # killed between the two renames of a replacement: the old folder is put back
    os.replace(final, tmp_path / ".old-adapter")
    ckpt.clean_stale(tmp_path)
    assert (final / "weights").read_text() == "old"


def test_not_enough_disk_space_is_a_clear_error_and_keeps_the_previous_checkpoint(
    tmp_path, setup, monkeypatch
):
    recipe, _ = setup
    calls = []
    real = ckpt.free_bytes

    def fake_free_bytes(folder):
        calls.append(folder)
        return real(folder) if len(calls) == 1 else 4096  # room for the first checkpoint only

    monkeypatch.setattr(ckpt, "free_bytes", fake_free_bytes)
    run_dir = tmp_path / "run"
    with pytest.raises(
        MoetuneError, match=r"not enough disk space to write the checkpoint of step 4.*MiB needed"
    ):
        launch_training(str(recipe), output_dir=run_dir)
    folder = run_dir / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-000002"]  # nothing half-written
    assert ckpt.read_trainer_state(folder / "step-000002")["step"] == 2
    assert not (run_dir / "adapter").exists()


def test_not_enough_disk_space_for_the_adapter_is_refused_before_writing(tmp_path, setup, monkeypatch):
    recipe, _ = setup
    run_dir = tmp_path / "run"
    real = ckpt.free_bytes  # room for the checkpoints, not for the adapter (checked in the run folder)
    monkeypatch.setattr(ckpt, "free_bytes", lambda folder: 4096 if folder == run_dir else real(folder))
    with pytest.raises(MoetuneError, match="not enough disk space to write the final adapter"):
        launch_training(str(recipe), output_dir=run_dir, overrides=["train.save_every=null"])
    assert not (run_dir / "adapter").exists() and not (run_dir / ".tmp-adapter").exists()


def _poisoned_forward(monkeypatch, step_of_nan, kind):
    """Make the loss (or only the gradients) non-finite in the step `step_of_nan`."""
    import finetune.train as train

    real = train.forward_loss
    calls = {"n": 0}

    def forward(model, batch, *, routes):
        out = real(model, batch, routes=routes)
        calls["n"] += 1  # one micro-batch per step in these recipes
        if calls["n"] == step_of_nan:
            if kind == "loss":
                out.loss_sum = out.loss_sum * float("nan")
            else:  # finite loss, NaN gradients: d sqrt(x)/dx at 0 is inf, times 0
                out.loss_sum = out.loss_sum + torch.sqrt(out.loss_sum * 0.0)
        return out

    monkeypatch.setattr(train, "forward_loss", forward)


@pytest.mark.parametrize("kind", ["loss", "grads"])
def test_nan_stops_naming_the_step_and_saves_nothing(tmp_path, setup, monkeypatch, kind):
    recipe, _ = setup
    _poisoned_forward(monkeypatch, 3, kind)
    run_dir = tmp_path / "run"
    what = "loss nan" if kind == "loss" else "gradient norm nan"
    with pytest.raises(MoetuneError, match=f"stopped at step 3: {what} is not finite.*step-000002"):
        launch_training(str(recipe), output_dir=run_dir)
    assert not (run_dir / "adapter").exists()
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step-000002"]


def test_nan_policy_skip_skips_the_step_and_keeps_the_adapter_finite(tmp_path, setup, monkeypatch):
    recipe, _ = setup
    _poisoned_forward(monkeypatch, 3, "grads")
    run_dir = tmp_path / "run"
    launch_training(str(recipe), output_dir=run_dir, overrides=["train.nan_policy=skip"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["skipped_steps"] == [3]
    assert metrics["steps"] == STEPS
    for value in adapter_tensors(run_dir).values():
        assert torch.isfinite(value).all()


def test_the_hub_token_never_reaches_a_file_of_the_run(tmp_path, setup, monkeypatch, capsys):
    recipe, _ = setup
    token = "hf_FAKEtokenFAKEtokenFAKEtoken12345"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", token)
    run_dir = tmp_path / "run"
    summary = str(
        launch_training(
            str(recipe), output_dir=run_dir, overrides=["train.eval_every=4", "data.eval_fraction=0.2"]
        )
    )
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert len(files) > 10  # adapter, card, metrics, recipe, plots, checkpoints, TensorBoard logs
    for path in files:
        assert token.encode() not in path.read_bytes(), path
    out = capsys.readouterr()
    assert token not in summary + out.out + out.err
