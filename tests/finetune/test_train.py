"""The training loop in one process: what a run writes, loss normalisation, resume rules, trackers."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from finetune.errors import MoetuneError
from finetune.losses import count_label_tokens
from finetune.resume import EpochSampler, step_seed
from finetune.train import launch_training
from tests.helpers.runs import adapter_tensors, history, write_corpus, write_recipe


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data") / "train.jsonl")


def test_a_run_writes_adapter_metrics_plots_recipe_and_logs(tmp_path, corpus):
    recipe = write_recipe(tmp_path, corpus, train={"eval_every": 4})
    summary = str(launch_training(str(recipe)))
    run = tmp_path / "run"

    adapter = run / "adapter"
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
        "recipe.yaml",
        "metrics.json",
    ):
        assert (adapter / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    for key in (
        "steps",
        "train_loss",
        "eval_loss_before",
        "eval_loss_after",
        "tokens_per_second",
        "trainable_params",
    ):
        assert metrics[key] is not None, key
    assert metrics["steps"] == 8
    assert metrics == json.loads((adapter / "metrics.json").read_text())
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    assert (run / "plots" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "plots" / "expert_load.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "recipe.yaml").is_file()
    assert list((run / "logs").rglob("events.out.tfevents.*")), "no TensorBoard events"
    # eval before, at step 4 and at the end; per-step train losses
    h = history(run)
    assert [s for s, _ in h["eval_loss"]] == [4, 8]
    assert [s for s, _ in h["train_loss"]] == list(range(1, 9))
    assert "perplexity" in summary and str(adapter) in summary
    # A checkpoint every save_every steps, and one at the end (a finished run stays resumable).
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000004", "step-000008"]

    # The adapter is plain PEFT: PeftModel.from_pretrained loads it with the trained values.
    from peft import PeftModel

    from finetune.loading import load_model

    torch.manual_seed(0)
    base, _ = load_model("preset:tiny")
    with warnings.catch_warnings():  # peft calls transformers' deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        model = PeftModel.from_pretrained(base, str(adapter))
    saved = adapter_tensors(run)
    loaded = {k: v for k, v in model.state_dict().items() if "lora" in k}
    assert len(loaded) == len(saved) > 0
    for value in saved.values():
        assert torch.isfinite(value).all()


class RecordingAdamW(torch.optim.AdamW):
    """AdamW that keeps, per optimizer step, the gradients it was given, and the weights before the
    first and after the last update (the training loop builds it as `torch.optim.AdamW`)."""

    records: list[dict] = []

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.record = {"grads": [], "start": None, "end": None}
        RecordingAdamW.records.append(self.record)

    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        if self.record["start"] is None:
            self.record["start"] = torch.cat([p.detach().flatten() for p in params])
        grads = [p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in params]
        self.record["grads"].append(torch.cat(grads).clone())
        out = super().step(closure)
        self.record["end"] = torch.cat([p.detach().flatten() for p in params])
        return out


def test_loss_is_normalised_by_the_global_token_count(tmp_path, corpus, monkeypatch):
    """batch 4 x accumulation 1 and batch 2 x accumulation 2 see the same examples per step and must
    give the same loss and the same gradient (a per-micro-batch mean would weight tokens differently)."""
    monkeypatch.setattr(RecordingAdamW, "records", [])
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    # The MoE aux loss is a per-micro-batch statistic (expert shares of that batch), so it
    # legitimately differs between the two batchings: leave it out to compare the LM loss exactly.
    import dataclasses

    import finetune.train as train

    real = train.forward_loss
    monkeypatch.setattr(
        train, "forward_loss", lambda *a, **k: dataclasses.replace(real(*a, **k), aux_loss=None)
    )
    one = tmp_path / "one"
    two = tmp_path / "two"
    one.mkdir()
    two.mkdir()
    settings = {"max_steps": 4, "save_every": None, "log_every": 1}
    launch_training(str(write_recipe(one, corpus, train={**settings, "batch_size": 4, "grad_accum": 1})))
    launch_training(str(write_recipe(two, corpus, train={**settings, "batch_size": 2, "grad_accum": 2})))
    a, b = history(one / "run")["train_loss"], history(two / "run")["train_loss"]
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    for (_, x), (_, y) in zip(a, b):
        assert x == pytest.approx(y, abs=1e-4)
    first, second = RecordingAdamW.records
    assert torch.equal(first["start"], second["start"])  # the same LoRA init: only the batching differs
    # The first step's gradients agree to float rounding (nothing has diverged yet); a mean per
    # micro-batch would differ by the ratio of the two micro-batches' token counts.
    g1, g2 = first["grads"][0], second["grads"][0]
    assert g1.abs().max() > 0
    torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-6 * float(g1.abs().max()))
    # Later steps start from weights that may differ by Adam's sign of near-zero gradients (g / sqrt(v)
    # on float noise): compare the whole training's change of the weights relative to its size.
    # Measured on this test: 5e-7 as normalised, 0.17 when each micro-batch's loss is its own mean
    # (the first step's gradients then differ by 3%), so the bound sits far from both.
    moved = first["end"] - first["start"]
    assert float((second["end"] - first["end"]).norm() / moved.norm()) < 1e-2


def test_existing_checkpoints_need_resume(tmp_path, corpus):
    recipe = write_recipe(
        tmp_path, corpus, train={"max_steps": 4, "save_every": 2}, data={"eval_fraction": None}
    )
    launch_training(str(recipe))
    with pytest.raises(MoetuneError, match="holds a finished run.*--overwrite.*--resume"):
        launch_training(str(recipe))
    # a checkpoint that lacks trainable weights is refused, not loaded half (loading is non-strict)
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "run" / "checkpoints" / "step-000004" / "model.safetensors"
    state = load_file(str(weights))
    save_file(dict(list(state.items())[1:]), str(weights))
    with pytest.raises(MoetuneError, match="lacks 1 trainable weight"):
        launch_training(str(recipe), resume=True)


def test_resume_refuses_a_changed_recipe(tmp_path, corpus):
    recipe = write_recipe(
        tmp_path, corpus, train={"max_steps": 4, "save_every": 2}, data={"eval_fraction": None}
    )
    launch_training(str(recipe))
    with pytest.raises(MoetuneError, match="recipe changed.*train.seed"):
        launch_training(str(recipe), overrides=["train.seed=1"], resume=True)


def test_resume_without_a_checkpoint_starts_from_zero(tmp_path, corpus):
    recipe = write_recipe(
        tmp_path, corpus, train={"max_steps": 2, "save_every": None}, data={"eval_fraction": None}
    )
    launch_training(str(recipe), resume=True)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 2


def test_a_tracker_that_is_not_installed_is_refused(tmp_path, corpus, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    recipe = write_recipe(tmp_path, corpus, output={"report_to": ["tensorboard", "wandb"]})
    with pytest.raises(MoetuneError, match="wandb.*not installed"):
        launch_training(str(recipe))


def test_epoch_sampler_order_is_a_function_of_seed_and_epoch():
    class Data:
        group_by_length = False

    sampler = EpochSampler(list(range(50)), Data(), batch_size=4, seed=3)
    sampler.set_epoch(2)
    first = list(sampler)
    sampler.set_epoch(0)
    list(sampler)
    sampler.set_epoch(2)
    assert list(sampler) == first
    assert sorted(first) == list(range(50))
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_length_grouped_order_is_also_a_function_of_seed_and_epoch():
    import datasets

    class Data:
        group_by_length = True

    lengths = [(i * 37) % 50 + 1 for i in range(200)]
    sampler = EpochSampler(datasets.Dataset.from_dict({"length": lengths}), Data(), batch_size=4, seed=0)
    sampler.set_epoch(1)
    first = list(sampler)
    sampler.set_epoch(0)
    other = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) == first != other
    assert sorted(first) == list(range(200))


def test_step_seed_differs_per_step_and_process():
    seeds = {step_seed(0, step, rank) for step in range(50) for rank in range(4)}
    assert len(seeds) == 200
    assert step_seed(0, 5, 1) == step_seed(0, 5, 1)


def test_label_tokens_are_counted_after_the_shift():
    labels = torch.tensor([[5, 6, 7, -100], [-100, -100, 8, 9]])
    # position 0 never has a target; the shifted labels are [6, 7, -100] and [-100, 8, 9]
    assert count_label_tokens(labels) == 4


def test_tensorboard_gets_loss_lr_aux_loss_and_expert_load(tmp_path, corpus):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    launch_training(str(write_recipe(tmp_path, corpus, train={"max_steps": 2, "save_every": None})))
    (events,) = [
        p.parent for p in (tmp_path / "run" / "logs").rglob("events.out.tfevents.*") if "moetune" in str(p)
    ][:1]
    tags = set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/lr",
        "train/aux_loss",
        "train/grad_norm",
        "train/tokens_per_second",
        "eval/loss",
        "eval/perplexity",
        "expert_load/layer_0/max_over_mean",
        "expert_load/layer_1/cv",
    ):
        assert tag in tags, (tag, sorted(tags))  # fmt: skip


@pytest.mark.parametrize(
    "settings",
    [["model.gradient_checkpointing=true"], ["train.mixed_precision=bf16"]],
    ids=["gradient_checkpointing", "bf16"],
)
def test_memory_and_precision_settings_train_the_same_model(tmp_path, corpus, settings, monkeypatch):
    """Gradient checkpointing recomputes the same numbers; bf16 autocast stays close to fp32."""
    import transformers.modeling_utils as hf

    recipe = write_recipe(tmp_path, corpus, train={"max_steps": 3, "save_every": None, "log_every": 1})
    launch_training(str(recipe), output_dir=tmp_path / "plain")
    real, calls = hf.checkpoint, []  # what transformers' activation checkpointing calls per layer
    monkeypatch.setattr(hf, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    launch_training(str(recipe), output_dir=tmp_path / "other", overrides=settings)
    assert bool(calls) == ("gradient_checkpointing" in settings[0])  # layers really were recomputed
    plain, other = history(tmp_path / "plain")["train_loss"], history(tmp_path / "other")["train_loss"]
    exact = "gradient_checkpointing" in settings[0]
    for (_, a), (_, b) in zip(plain, other):
        if exact:
            assert a == pytest.approx(b, abs=1e-5)
        else:
            assert a == pytest.approx(b, abs=5e-2) and a != b  # autocast really ran in bf16


def test_epochs_run_every_example_once_per_epoch(tmp_path, corpus, monkeypatch):
    """Every training example goes through the model exactly once in each epoch (no example skipped
    or repeated at an epoch boundary or an accumulation boundary), and the epochs differ in order."""
    from collections import Counter

    import finetune.train as train
    from finetune.data import prepare_datasets
    from finetune.loading import load_model
    from finetune.recipe import load_recipe

    seen = []  # one tuple of real (unpadded) tokens per example that reached the model, in order
    real = train.forward_loss

    def recording(model, batch, *, routes):
        for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
            seen.append(tuple(i for i, m in zip(ids, mask) if m))
        return real(model, batch, routes=routes)

    monkeypatch.setattr(train, "forward_loss", recording)
    recipe = write_recipe(
        tmp_path, corpus, data={"eval_fraction": None},
        train={"max_steps": None, "epochs": 2, "batch_size": 8, "grad_accum": 2, "save_every": None},
    )  # fmt: skip
    launch_training(str(recipe))
    # 96 examples / (8 x 2) = 6 steps per epoch
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 12
    r = load_recipe(str(recipe))
    examples = prepare_datasets(r.data, load_model("preset:tiny")[1], seed=r.train.seed).train
    every = Counter(tuple(row) for row in examples["input_ids"])
    assert sum(every.values()) == 96 and len(seen) == 2 * 96
    first, second = seen[:96], seen[96:]
    assert Counter(first) == every and Counter(second) == every
    assert first != second  # reshuffled per epoch


def test_push_to_hub_pushes_the_adapter_folder_at_the_end(tmp_path, corpus, monkeypatch):
    import adapters.hub

    pushed = []
    monkeypatch.setattr(
        adapters.hub, "push_folder", lambda folder, repo, **kw: pushed.append((folder, repo, kw)) or "ok"
    )
    recipe = write_recipe(
        tmp_path, corpus, train={"max_steps": 1, "save_every": None}, output={"push_to_hub": "me/tiny-lora", "private": True}
    )  # fmt: skip
    launch_training(str(recipe))
    assert pushed == [
        (tmp_path / "run" / "adapter", "me/tiny-lora", {"private": True, "revision": None, "dry_run": False})
    ]


def test_the_commands_in_docs_training_md_parse():
    import re
    import shlex

    from cli import build_parser
    from finetune.launch import entry_parser
    from tests.helpers.runs import ROOT

    text = (ROOT / "docs" / "training.md").read_text()
    commands = re.findall(r"^((?:moetune train|accelerate launch) .+?)(?:\s+#.*)?$", text, re.M)
    assert len(commands) >= 6
    parser = build_parser()
    for command in commands:
        args = shlex.split(command)
        if args[0] == "accelerate":
            assert (ROOT / args[args.index("--config_file") + 1]).is_file(), command
            if "-m" in args:  # the entry point `moetune train --num-processes N` launches
                assert args[args.index("-m") + 1] == "finetune.train", command
                assert entry_parser().parse_args(args[args.index("-m") + 2 :]).recipe, command
                continue
            args = ["moetune", *args[args.index("cli.py") + 1 :]]
        parsed = parser.parse_args(args[1:])
        assert parsed.command == "train", command


def test_only_the_newest_checkpoints_are_kept(tmp_path, corpus):
    recipe = write_recipe(
        tmp_path, corpus, data={"eval_fraction": None},
        train={"max_steps": 8, "save_every": 2}, output={"keep_checkpoints": 2},
    )  # fmt: skip
    launch_training(str(recipe))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step-000006",
        "step-000008",
    ]


def test_recipe_helper_writes_a_valid_recipe(tmp_path):
    from finetune.recipe import load_recipe

    recipe = load_recipe(str(write_recipe(tmp_path, write_corpus(tmp_path / "d.jsonl"))))
    assert recipe.model.name == "preset:tiny"
    assert recipe.train.save_every == 4
