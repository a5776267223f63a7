"""Merging a multimodal adapter: Linear and Conv2d LoRA folded in, fully trained modules written in place."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from adapters import apply_lora
from adapters.combine import combine_adapters
from adapters.merge import merge_into_base
from finetune import MoetuneError
from finetune.loading import init_model


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_merge_folds_linear_and_conv_lora_writes_full_modules_and_matches_peft(tmp_path):
    base_dir = init_model("tiny", tmp_path / "base", modalities=["image", "text"]).folder
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    # encoders: LoRA on the text encoder's Linear and the ResNet's Conv2d layers; projector: trained in full
    peft_model = apply_lora(model, targets=["attention", "experts", "encoders", "projector"], r=4, alpha=8)
    with torch.no_grad():  # a non-trivial adapter: LoRA B and the fully trained modules both move
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    peft_model.save_pretrained(tmp_path / "adapter")

    merge_into_base(base_dir, tmp_path / "adapter", tmp_path / "merged")

    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter"
    ).merge_and_unload()
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    expected = reference.state_dict()
    moved = [k for k in merged if "projectors" in k or "fusion_gate" in k or "convolution" in k]
    assert any("convolution" in k for k in moved) and any("projectors" in k for k in moved)
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[key], rtol=1e-5, atol=1e-6, msg=key)
    base = load_file(base_dir / "model.safetensors")
    assert any(not torch.equal(base[k], merged[k]) for k in moved)


def test_combining_adapters_with_fully_trained_modules_is_refused(tmp_path):
    base_dir = init_model("tiny", tmp_path / "base", modalities=["image", "text"]).folder
    for name in ("a", "b"):
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        apply_lora(model, targets=["attention", "projector"], r=4).save_pretrained(tmp_path / name)
    with pytest.raises(MoetuneError, match="modules_to_save"):
        combine_adapters([tmp_path / "a", tmp_path / "b"], tmp_path / "ab", method="linear")


def test_combining_conv_lora_is_refused_in_one_line(tmp_path):
    base_dir = init_model("tiny", tmp_path / "base", modalities=["image", "text"]).folder
    for name in ("a", "b"):
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        apply_lora(model, targets=["attention", "encoders"], r=4).save_pretrained(tmp_path / name)
    with pytest.raises(MoetuneError, match="Conv2d") as err:
        combine_adapters([tmp_path / "a", tmp_path / "b"], tmp_path / "ab", method="linear")
    assert "\n" not in str(err.value)
