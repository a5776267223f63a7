"""Memory planning on the meta device."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

import cli
from adapters import apply_lora
from finetune import MoetuneError
from finetune.modeling import preset_config
from finetune.plan import plan_memory


def test_trainable_count_is_what_apply_lora_creates_on_a_real_model():
    plan = plan_memory("preset:tiny", targets=("attention", "experts"), r=4, dtype="float32")
    real = apply_lora(
        AutoModelForCausalLM.from_config(preset_config("tiny")), targets=["attention", "experts"], r=4
    )
    assert plan.params_trainable == sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert plan.weights_gib * 1024**3 == pytest.approx(plan.params_total * 4)


def test_full_preset_switches_to_fsdp_when_replicas_do_not_fit():
    one = plan_memory("preset:full", gpus=1, gpu_memory_gib=24)
    assert not one.fits and one.strategy == "ddp"
    eight = plan_memory("preset:full", gpus=8, gpu_memory_gib=24)
    assert eight.strategy == "fsdp" and eight.fits
    assert eight.weights_gib == pytest.approx(one.weights_gib / 8)


def test_bad_gpu_count_is_a_user_error():
    with pytest.raises(MoetuneError, match="--gpus"):
        plan_memory("preset:tiny", gpus=0)


def test_plan_command_prints_the_verdict(capsys):
    assert cli.main(["plan", "preset:small", "--gpus", "2"]) == 0
    assert "fits" in capsys.readouterr().out
