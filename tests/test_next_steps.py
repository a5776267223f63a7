"""Every adapter `moetune train` writes goes on to every next step: generate, merge (verified),
export-adapter, push --dry-run, and plain `PeftModel.from_pretrained` with the same outputs.

One case per adapter target group (and the bundled recipes' own mixes), text and multimodal, each
trained for one step with the real training entry point on a tiny base folder.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapters import load_adapter
from adapters.errors import MoetuneError
from adapters.export import export_adapter
from adapters.hub import push_folder
from adapters.merge import merge_into_base
from finetune.data.synthetic_mm import materialize
from finetune.generation import generate_text
from finetune.loading import init_model, load_model
from finetune.train import launch_training
from tests.helpers.runs import write_corpus, write_recipe

TEXT_CASES = {
    "attention": {"targets": ["attention"]},
    "experts": {"targets": ["experts"]},
    "experts-esft": {"targets": ["experts"], "experts": {1: [0, 3]}},
    "experts-esft-in-run": {"targets": ["experts"], "experts": {"threshold": 0.5}},  # selected by the run
    "shared_experts": {"targets": ["shared_experts"]},
    "dense_mlp": {"targets": ["dense_mlp"]},
    "router-lora": {"targets": ["router"], "router": "lora"},
    "router-train": {"targets": ["attention"], "router": "train"},
    "lm_head": {"targets": ["lm_head"]},
    "quickstart-mix": {"targets": ["attention", "experts", "lm_head"]},
}
MULTIMODAL_CASES = {
    "encoders": {"targets": ["encoders"]},
    "encoders+projector": {"targets": ["encoders", "projector"]},
    "mm-caption-mix": {
        "targets": ["attention", "experts", "shared_experts", "encoders", "projector", "lm_head"]
    },
}


@pytest.fixture(scope="module")
def text_base(tmp_path_factory) -> Path:
    """The tiny preset with one leading dense layer, so every decoder group exists."""
    from finetune.modeling import preset_config
    from finetune.tokenizer import build_tokenizer

    folder = tmp_path_factory.mktemp("bases") / "text"
    config = preset_config("tiny", first_k_dense_replace=1)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    build_tokenizer(config.vocab_size).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def mm_base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bases") / "mm"
    init_model("tiny", folder, modalities=["image"], seed=0)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data") / "train.jsonl", n=16)


def _train(tmp_path: Path, base: Path, data: dict, adapter: dict) -> Path:
    recipe = write_recipe(
        tmp_path,
        Path(data.pop("train")),
        model={"name": str(base)},
        adapter={"r": 4, "alpha": 8, **adapter},
        data={"eval_fraction": None, "max_length": 32, **data},
        train={"max_steps": 1, "save_every": None, "log_every": 1, "lr": 5e-2},
    )
    launch_training(str(recipe))
    return tmp_path / "run" / "adapter"


def _logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**inputs).logits


def _check_next_steps(tmp_path: Path, base: Path, adapter: Path, inputs: dict, generate_kwargs: dict) -> None:
    from peft import PeftModel

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve())

    # moetune's loader and plain PEFT load it and agree; the adapter changes the outputs.
    model, _ = load_model(str(base))
    plain_base = _logits(model, inputs)
    ours = _logits(load_adapter(model, adapter), inputs)
    with warnings.catch_warnings():  # peft calls transformers' deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapter)
        )
    torch.testing.assert_close(_logits(peft_model, inputs), ours, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours, plain_base), "the trained adapter changes nothing"

    # generate with it
    assert isinstance(
        generate_text(str(base), adapter=str(adapter), max_new_tokens=3, **generate_kwargs), str
    )

    # merge, verified against base + adapter; the merged model gives the adapted outputs
    report = merge_into_base(base, adapter, tmp_path / "merged", verify=True)
    assert report.verify.passed and "verify-merge passed" in str(report)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(_logits(merged, inputs), ours, rtol=1e-4, atol=1e-4)

    # export per expert and back, bit for bit (adapters without expert LoRA are refused in one line)
    if any(p.endswith(("gate_up_proj", "down_proj")) for p in config.get("target_parameters") or []):
        export_adapter(adapter, tmp_path / "per-expert", fmt="per-expert")
        export_adapter(tmp_path / "per-expert", tmp_path / "round-trip", fmt="peft")
        from safetensors.torch import load_file

        before = load_file(adapter / "adapter_model.safetensors")
        after = load_file(tmp_path / "round-trip" / "adapter_model.safetensors")
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)
    else:
        with pytest.raises(MoetuneError, match="no expert .* LoRA; nothing to export"):
            export_adapter(adapter, tmp_path / "per-expert", fmt="per-expert")

    # push --dry-run: files listed, card valid
    staged = push_folder(adapter, "you/adapter", dry_run=True)
    assert staged.dry_run and staged.commit_url is None and "model card: valid" in str(staged)


@pytest.mark.parametrize("case", list(TEXT_CASES))
def test_every_text_adapter_goes_on_to_every_next_step(case, tmp_path, text_base, corpus):
    adapter = _train(tmp_path, text_base, {"train": str(corpus)}, dict(TEXT_CASES[case]))
    _, tokenizer = load_model(str(text_base))
    inputs = dict(tokenizer(["def f(x):\n    return x"], return_tensors="pt"))
    _check_next_steps(tmp_path, text_base, adapter, inputs, {"prompt": "def "})


@pytest.mark.parametrize("case", list(MULTIMODAL_CASES))
def test_every_multimodal_adapter_goes_on_to_every_next_step(case, tmp_path, mm_base):
    from finetune.data.multimodal import prepare_multimodal_inputs

    records = materialize("synthetic:shapes-caption:8")
    image = json.loads(records.read_text().splitlines()[0])["image"]
    data = {"train": "synthetic:shapes-caption:8", "format": "multimodal"}
    adapter = _train(tmp_path, mm_base, data, dict(MULTIMODAL_CASES[case]))
    _, processor = load_model(str(mm_base))
    inputs = prepare_multimodal_inputs(processor, "a", image=image)
    _check_next_steps(tmp_path, mm_base, adapter, inputs, {"prompt": "a", "image": image})


def test_whole_module_targets_alone_are_refused_at_construction(mm_base):
    from adapters import apply_lora

    model, _ = load_model(str(mm_base))
    with pytest.raises(MoetuneError, match=r"projector trains whole modules .* add a group") as err:
        apply_lora(model, targets=["projector"])
    assert "\n" not in str(err.value)
