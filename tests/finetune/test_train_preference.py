"""train.method dpo / orpo / simpo through the one training loop: the reference is the adapter disabled,
runs learn the preference, resume replays exactly, two processes equal one, NF4 experts and ESFT
expert selections train, and the adapter is a plain PEFT adapter."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from adapters import apply_lora, load_adapter
from finetune.data.preference import PreferenceCollator, preference_pairs
from finetune.errors import MoetuneError
from finetune.losses import PairLogps
from finetune.preference import make_objective
from finetune.train import launch_training
from tests.helpers.models import FAMILIES, build
from tests.helpers.runs import adapter_tensors, history, write_recipe
from tests.helpers.tokenizers import tiny_tokenizer

DATA = {
    "train": "synthetic:case-preference:48",
    "eval": "synthetic:case-preference:16",
    "eval_fraction": None,
    "format": "preference",
    "max_length": 64,
}


def pair_batch(tok) -> dict[str, torch.Tensor]:
    records = [
        {
            "prompt": "Write in upper case: river stone\nAnswer: ",
            "chosen": "RIVER STONE",
            "rejected": "river stone",
        },
        {"prompt": "Write in lower case: apple\nAnswer: ", "chosen": "apple", "rejected": "APPLE"},
    ]
    pairs = preference_pairs(records, tok, "prompt", None)
    return PreferenceCollator(tok.pad_token_id)(
        [dict(zip(("prompt_ids", "chosen_ids", "rejected_ids"), p)) for p in pairs]
    )


def randomise_lora(model) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_is_the_adapter_disabled_and_equals_a_frozen_copy_of_the_base(family):
    tok = tiny_tokenizer()
    base = build(family, vocab_size=len(tok))
    frozen = copy.deepcopy(base)
    model = apply_lora(base, targets=["attention", "experts"], r=4, alpha=8)
    randomise_lora(model)
    batch = pair_batch(tok)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    objective = make_objective("dpo", None)
    objective.reference_model = model
    reference = objective.reference_logps(inputs, batch["labels"])
    with torch.no_grad():
        copied = PairLogps.of(frozen(**inputs).logits, batch["labels"])
        policy = PairLogps.of(model(**inputs).logits, batch["labels"])
    torch.testing.assert_close(reference.chosen, copied.chosen)
    torch.testing.assert_close(reference.rejected, copied.rejected)
    assert not torch.allclose(policy.chosen, copied.chosen)  # the adapter is on again afterwards


def train(folder, name, *, method="dpo", overrides=(), num_processes=1, **sections):
    sections.setdefault("train", {})
    sections["train"] = {"method": method, "max_steps": 6, "save_every": 3, "lr": 5e-3, **sections["train"]}
    sections["data"] = {**DATA, **sections.get("data", {})}
    recipe = write_recipe(folder, None, **sections)
    launch_training(
        str(recipe), output_dir=folder / name, overrides=list(overrides), num_processes=num_processes
    )
    return recipe, folder / name


@pytest.mark.parametrize(
    "method, settings", [("dpo", None), ("orpo", {"lambda": 1.0}), ("simpo", None)]
)  # ORPO's default lambda 0.1 leaves 8 steps to its NLL term: the margin barely moves
def test_each_method_trains_logs_rewards_and_writes_a_plain_peft_adapter(tmp_path, method, settings):
    from peft import PeftModel

    from finetune.loading import load_model

    train_keys = {"max_steps": 8, "lr": 2e-2, "eval_every": 4, "preference": settings}
    _, run = train(tmp_path, "run", method=method, train=train_keys)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 8
    assert (
        metrics["reward_accuracy_after"] is not None
        and metrics["reward_margin_after"] > metrics["reward_margin_before"]
    )
    assert metrics["eval_loss_before"] is not None  # the chosen answers' SFT loss
    rewards = history(run)["eval_rewards"]  # [step, accuracy, margin, preference loss]
    assert [row[0] for row in rewards] == [0, 4, 8]
    assert rewards[-1][1:3] == [metrics["reward_accuracy_after"], metrics["reward_margin_after"]]
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in history(run)["train_loss"])

    inputs = {"input_ids": torch.tensor([[5, 9, 14, 22, 31, 40]])}
    model, _ = load_model("preset:tiny")
    with torch.no_grad():
        ours = load_adapter(model, run / "adapter")(**inputs).logits
    with warnings.catch_warnings():  # peft calls transformers' deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        base, _ = load_model("preset:tiny")
        plain = PeftModel.from_pretrained(base, str(run / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, ours, rtol=1e-4, atol=1e-4)


def assert_same_adapters(a, b, atol: float = 0.0) -> None:
    first, second = adapter_tensors(a), adapter_tensors(b)
    assert first.keys() == second.keys()
    for key, value in first.items():
        if atol:
            assert (value - second[key]).abs().max() <= atol, key
        else:
            assert torch.equal(value, second[key]), key


def test_resumed_dpo_run_gives_the_same_adapter_and_refuses_another_method(tmp_path, monkeypatch):
    """Stopped by SIGTERM after step 4 (a checkpoint is written), resumed: steps 5-6 only, same adapter."""
    import cli

    recipe, whole = train(tmp_path, "whole", train={"save_every": 2})
    monkeypatch.setenv("MOETUNE_FAILPOINT", "after-step@4:SIGTERM")
    assert cli.main(["train", str(recipe), "--output", str(tmp_path / "parts")]) == 143
    monkeypatch.delenv("MOETUNE_FAILPOINT")
    launch_training(str(recipe), output_dir=tmp_path / "parts", resume=True)
    assert json.loads((tmp_path / "parts" / "metrics.json").read_text())["resumed_at"] == [4]
    assert_same_adapters(whole, tmp_path / "parts")
    assert history(whole)["eval_rewards"] == history(tmp_path / "parts")["eval_rewards"]
    with pytest.raises(
        MoetuneError, match=r"the recipe changed \(train.method\)"
    ):  # the method is fingerprinted
        launch_training(str(recipe), output_dir=whole, resume=True, overrides=["train.method=simpo"])


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path):
    """DDP: the step's loss is normalised by the global pair count, so 2 x batch 2 = 1 x batch 2 x accum 2."""
    keys = {"max_steps": 2, "batch_size": 2, "save_every": 2, "eval_every": None}
    train(tmp_path, "one", train={**keys, "grad_accum": 2})
    train(tmp_path, "two", train=keys, num_processes=2)
    one, two = history(tmp_path / "one"), history(tmp_path / "two")
    assert [s for s, _ in one["train_loss"]] == [s for s, _ in two["train_loss"]] == [1, 2]
    for (_, a), (_, b) in zip(one["train_loss"], two["train_loss"]):
        assert a == pytest.approx(b, abs=1e-5)
    for a, b in zip(one["eval_rewards"], two["eval_rewards"]):
        assert a == pytest.approx(b, abs=1e-4)
    assert_same_adapters(tmp_path / "one", tmp_path / "two", atol=1e-5)


def test_dpo_on_nf4_experts_with_an_expert_selection(tmp_path):
    """QLoRA for MoE plus ESFT: the reference forward (adapter disabled) runs through the quantized
    experts, and only the selected experts carry LoRA."""
    from finetune.loading import init_model

    base = init_model("tiny", tmp_path / "base").folder
    _, run = train(
        tmp_path,
        "run",
        model={"name": str(base), "quantize": "nf4"},
        adapter={"targets": ["experts"], "experts": {0: [1, 5], 1: [2]}},
        train={"max_steps": 4, "lr": 2e-2},
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["reward_margin_after"] > metrics["reward_margin_before"] == 0.0
    saved = adapter_tensors(run)
    assert saved and all("experts" in key for key in saved)
    assert all(torch.isfinite(v).all() for v in saved.values())
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"]


def test_the_bundled_recipe_runs_with_the_short_overrides(tmp_path, capsys):
    import cli
    from tests.helpers.runs import SHORT

    argv = ["train", "preference", "--output", str(tmp_path / "run")]
    for override in SHORT:
        argv += ["--set", override]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "held-out reward accuracy 0.000 -> " in out  # DPO: the policy starts equal to its reference
    assert "held-out eval loss (chosen answers)" in out


def test_reference_on_nf4_experts_is_the_quantized_base(tmp_path):
    """With quantized experts the adapter-disabled forward is exactly the quantized base's forward."""
    from finetune.loading import init_model, load_model

    base = init_model("tiny", tmp_path / "base").folder
    quantized, tok = load_model(str(base), quantize="nf4")
    frozen, _ = load_model(str(base), quantize="nf4")
    model = apply_lora(quantized, targets=["attention", "experts"], r=4, alpha=8)
    randomise_lora(model)
    batch = pair_batch(tok)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    objective = make_objective("dpo", None)
    objective.reference_model = model
    reference = objective.reference_logps(inputs, batch["labels"])
    with torch.no_grad():
        copied = PairLogps.of(frozen(**inputs).logits, batch["labels"])
    torch.testing.assert_close(reference.chosen, copied.chosen)
    torch.testing.assert_close(reference.rejected, copied.rejected)


def test_a_dpo_adapter_goes_on_to_generate_merge_export_and_push(tmp_path):
    """The next steps of tests/test_next_steps.py, for an adapter trained with a preference objective."""
    from adapters.export import export_adapter
    from adapters.hub import push_folder
    from adapters.merge import merge_into_base
    from finetune.generation import generate_text
    from finetune.loading import init_model

    base = init_model("tiny", tmp_path / "base").folder
    _, run = train(tmp_path, "run", model={"name": str(base)}, train={"max_steps": 2, "lr": 5e-2})
    adapter = run / "adapter"
    assert isinstance(
        generate_text(str(base), "Write in upper case: apple", adapter=str(adapter), max_new_tokens=3), str
    )
    report = merge_into_base(base, adapter, tmp_path / "merged", verify=True)
    assert report.verify.passed
    export_adapter(adapter, tmp_path / "per-expert", fmt="per-expert")
    assert push_folder(adapter, "you/adapter", dry_run=True).dry_run
