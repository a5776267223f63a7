"""The terms of `moetune plan` one by one: what autograd keeps, the engines' buffers and gathers, the
DeepSpeed settings they assume. The whole plan against measured processes: test_plan_measured.py."""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from adapters import apply_lora
from finetune import MoetuneError
from finetune import plan_terms as terms
from finetune.modeling import preset_config
from finetune.plan import GIB, plan_memory
from finetune.recipe.files import RECIPES_DIR

SMALL = {"dtype": "float32", "targets": ("attention", "experts"), "r": 16, "gpus": 2}


def _saved_bytes(config, batch: int, seq: int, r: int) -> int:
    """Bytes autograd keeps for backward after one forward (storages, each once; parameters excluded)."""
    torch.manual_seed(0)
    model = apply_lora(AutoModelForCausalLM.from_config(config), targets=["attention", "experts"], r=r)
    seen = {p.untyped_storage().data_ptr(): 0 for p in model.parameters()}

    def keep(t: torch.Tensor) -> torch.Tensor:
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    ids = torch.randint(3, config.vocab_size, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(seen.values())


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"num_experts_per_tok": 4, "moe_intermediate_size": 256},
        {"num_experts": 32, "num_shared_experts": 0},
    ],
)
def test_activation_estimate_is_what_autograd_keeps(overrides):
    config = preset_config("small", num_hidden_layers=2, **overrides)
    batch, seq, r = 2, 128, 8
    saved = _saved_bytes(config, batch, seq, r)
    # The estimate, plus the fp32 log-softmax the loss keeps (in the logits term of the plan).
    planned = terms.activation_bytes(config, batch, seq, 4, r, checkpointing=False)
    planned += batch * seq * config.vocab_size * 4
    assert planned == pytest.approx(saved, rel=0.1)


def test_checkpointing_keeps_layer_inputs_and_one_layer():
    config = preset_config("small")
    full = terms.activation_bytes(config, 4, 512, 2, 16, checkpointing=False)
    ckpt = terms.activation_bytes(config, 4, 512, 2, 16, checkpointing=True)
    one_layer = full / config.num_hidden_layers
    assert one_layer < ckpt < full / 2


def test_lora_state_is_16_bytes_per_parameter_and_partitioned_by_sharding_engines():
    ddp = plan_memory("preset:small", strategy="ddp", **SMALL)
    assert ddp.adapter_and_optimizer_gib * GIB == ddp.params_trainable * 16
    for strategy in ("fsdp", "zero3"):
        plan = plan_memory("preset:small", strategy=strategy, **SMALL)
        assert plan.adapter_and_optimizer_gib == pytest.approx(ddp.adapter_and_optimizer_gib / 2)


def test_ddp_buckets_copy_the_lora_gradients_only_with_several_processes():
    two = plan_memory("preset:small", strategy="ddp", **SMALL)
    one = plan_memory("preset:small", strategy="ddp", **(SMALL | {"gpus": 1}))
    assert two.engine_buffers_gib * GIB == two.params_trainable * 4
    assert one.engine_buffers_gib == 0 and two.gathered_gib == 0
    assert two.load_peak_gib > one.load_peak_gib  # the broadcast of the states from process 0


def test_zero3_reduce_bucket_is_allocated_whole_on_a_gpu_and_written_in_part_on_a_cpu():
    gpu = plan_memory("preset:small", strategy="zero3", **SMALL)
    cpu = plan_memory("preset:small", strategy="zero3", device="cpu", **SMALL)
    assert gpu.engine_buffers_gib * GIB == terms.ZERO3_REDUCE_BUCKET * 4
    assert cpu.engine_buffers_gib * GIB == cpu.params_trainable * 4  # fewer LoRA gradients than the bucket
    assert gpu.total_gib - cpu.total_gib == pytest.approx(gpu.engine_buffers_gib - cpu.engine_buffers_gib)
    with pytest.raises(MoetuneError, match="plan device 'tpu' is not one of gpu, cpu"):
        plan_memory("preset:tiny", device="tpu")


def test_gathered_parameters_fsdp_one_layer_at_a_time_zero3_the_whole_base_under_its_live_limit(monkeypatch):
    ddp = plan_memory("preset:small", strategy="ddp", **SMALL)
    fsdp = plan_memory("preset:small", strategy="fsdp", **SMALL)
    fsdp8 = plan_memory("preset:small", strategy="fsdp", **(SMALL | {"gpus": 8}))
    zero3 = plan_memory("preset:small", strategy="zero3", **SMALL)
    lora = ddp.params_trainable * 4 / GIB
    # preset:small: 4 equal decoder layers; FSDP2 holds two of them (running, prefetched) and the root.
    assert fsdp.gathered_gib == fsdp8.gathered_gib
    assert ddp.weights_gib / 2 < fsdp.gathered_gib < (ddp.weights_gib + lora) * 3 / 4
    # Far under DeepSpeed's 1e9 live elements: the whole base and LoRA stay gathered after step 1.
    assert zero3.gathered_gib == pytest.approx(ddp.weights_gib + lora)
    monkeypatch.setattr(terms, "ZERO3_MAX_LIVE", 1_000_000)  # a base over the limit
    capped = plan_memory("preset:small", strategy="zero3", **SMALL)
    assert capped.gathered_gib * GIB == 1_000_000 * 4  # fp32, the frozen base first


def test_quantized_experts_are_never_gathered():
    fsdp = plan_memory("preset:small", strategy="fsdp", **SMALL)
    q_fsdp = plan_memory("preset:small", strategy="fsdp", quantize="int8", **SMALL)
    q_zero3 = plan_memory("preset:small", strategy="zero3", quantize="int8", **SMALL)
    assert q_fsdp.gathered_gib < fsdp.gathered_gib / 4
    assert q_zero3.gathered_gib < fsdp.gathered_gib


def test_lora_on_lm_head_adds_one_logits_tensor():
    plain = plan_memory("preset:small", **SMALL, batch_size=2, seq_len=64)
    head = plan_memory(
        "preset:small", **(SMALL | {"targets": ("attention", "experts", "lm_head")}), batch_size=2, seq_len=64
    )
    vocab = preset_config("small").vocab_size
    assert (head.logits_gib - plain.logits_gib) * GIB == 2 * 64 * vocab * 4


def test_zero3_constants_are_deepspeeds_defaults_and_the_bundled_config_keeps_them():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    defaults = DeepSpeedZeroConfig()
    assert defaults.reduce_bucket_size == terms.ZERO3_REDUCE_BUCKET
    assert defaults.max_live_parameters == terms.ZERO3_MAX_LIVE
    bundled = yaml.safe_load((RECIPES_DIR / "accelerate" / "deepspeed-zero3.yaml").read_text())[
        "deepspeed_config"
    ]
    assert "deepspeed_config_file" not in bundled  # the only way to set the bucket sizes
    assert bundled["zero_stage"] == 3


def test_plan_output_says_what_it_does_not_count():
    text = str(plan_memory("preset:small", strategy="zero3", **SMALL))
    assert "reduce bucket" in text and "gathered whole at once" in text and "not counted:" in text
    assert "allocator caching" in text
