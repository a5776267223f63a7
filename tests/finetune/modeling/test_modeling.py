"""The built-in architecture: forward/backward, aux loss, experts implementations, cache, save/load."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import finetune  # noqa: F401  (registers the Auto classes)
from finetune.loading import build_empty_model
from finetune.modeling import MoetuneConfig, MoetuneForCausalLM, preset_config
from tests.helpers.models import build, random_batch


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_forward_backward_every_cpu_preset(preset):
    config = preset_config(preset)
    model = AutoModelForCausalLM.from_config(config)
    batch = random_batch(batch=2, length=16)
    out = model(**batch)
    assert out.logits.shape == (2, 16, config.vocab_size)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (
        config.num_experts,
        2 * config.moe_intermediate_size,
        config.hidden_size,
    )
    assert experts.down_proj.shape == (config.num_experts, config.hidden_size, config.moe_intermediate_size)
    assert experts.gate_up_proj.grad.abs().sum() > 0


def test_full_preset_is_built_on_meta_at_real_scale():
    config = preset_config("full")
    model = build_empty_model(config)
    total = sum(p.numel() for p in model.parameters())
    assert 10e9 <= total <= 30e9
    assert config.num_experts == 128 and config.num_experts_per_tok == 8 and config.num_shared_experts == 1
    assert all(p.device.type == "meta" for p in model.parameters())


def test_aux_loss_is_returned_added_to_loss_and_reacts_to_imbalance():
    model = build("moetune")
    batch = random_batch(batch=2, length=16)
    out = model(**batch)
    assert out.aux_loss is not None and out.router_logits is not None
    lm_only = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), batch["labels"][:, 1:].reshape(-1)
    )
    torch.testing.assert_close(out.loss, lm_only + model.config.router_aux_loss_coef * out.aux_loss)

    balanced = out.aux_loss.item()
    with torch.no_grad():  # a router whose softmax mass sits on experts 0 and 1 for every token
        for layer in model.model.layers:
            direction = torch.randn(model.config.hidden_size) * 100
            layer.mlp.gate.weight.zero_()
            layer.mlp.gate.weight[0], layer.mlp.gate.weight[1] = direction, -direction
    skewed = model(**batch).aux_loss.item()
    assert skewed > balanced * 1.5


def test_router_logits_on_request_only():
    model = build("moetune")
    batch = random_batch()
    assert model(input_ids=batch["input_ids"]).router_logits is None
    logits = model(input_ids=batch["input_ids"], output_router_logits=True).router_logits
    assert len(logits) == model.config.num_hidden_layers
    assert logits[0].shape == (batch["input_ids"].numel(), model.config.num_experts)


def test_experts_implementations_agree():
    model = build("moetune")
    batch = random_batch(batch=2, length=16)
    outputs = {}
    for impl in ("eager", "batched_mm", "grouped_mm"):
        model.set_experts_implementation(impl)
        outputs[impl] = model(**batch).logits
    torch.testing.assert_close(outputs["eager"], outputs["batched_mm"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs["eager"], outputs["grouped_mm"], rtol=1e-5, atol=1e-5)


def test_greedy_generation_with_cache_equals_without():
    model = build("moetune")
    prompt = random_batch(batch=1, length=6)["input_ids"]
    cached = model.generate(prompt, max_new_tokens=24, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=24, do_sample=False, use_cache=False)
    assert cached.shape == (1, 30)
    assert torch.equal(cached, uncached)


def test_save_and_auto_load_give_identical_logits(tmp_path):
    model = build("moetune")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(reloaded, MoetuneForCausalLM)
    for (name, saved), (_, loaded) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(saved, loaded), name
    for (name, saved), (_, loaded) in zip(model.named_buffers(), reloaded.named_buffers()):
        assert torch.equal(saved, loaded), name  # non-persistent buffers are rebuilt, not garbage
    batch = random_batch()
    # Same weights; transformers may pick another grouped-mm kernel for memory-mapped tensors,
    # so logits agree to float rounding rather than bit for bit.
    torch.testing.assert_close(model(**batch).logits, reloaded(**batch).logits, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = random_batch(batch=2, length=12)
    grads = []
    for checkpointing in (False, True):
        model = build("moetune").train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(**batch).loss.backward()
        grads.append(model.model.layers[0].mlp.experts.down_proj.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_shared_experts_and_leading_dense_layers():
    config = preset_config("tiny", num_hidden_layers=3, first_k_dense_replace=1, num_shared_experts=2)
    model = AutoModelForCausalLM.from_config(config)
    assert not hasattr(model.model.layers[0].mlp, "experts")
    assert model.model.layers[1].mlp.shared_experts.gate_proj.out_features == 2 * config.moe_intermediate_size
    assert torch.isfinite(model(**random_batch()).loss)


def test_padding_mask_changes_nothing_for_real_tokens():
    model = build("moetune")
    ids = random_batch(batch=1, length=8)["input_ids"]
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], dim=1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    alone = model(input_ids=ids).logits
    left_padded = model(input_ids=padded, attention_mask=mask, position_ids=position_ids).logits[:, 3:]
    torch.testing.assert_close(alone, left_padded, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_experts=4, num_experts_per_tok=8), "num_experts_per_tok"),
        (dict(attention_type="flash"), "attention_type"),
        (dict(attention_type=["dense"]), "one entry per layer"),
    ],
)
def test_config_refuses_inconsistent_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoetuneConfig(**kwargs)


def test_bf16_forward_tracks_fp32():
    model = build("moetune")
    batch = random_batch(batch=2, length=16)
    fp32 = model(**batch).logits
    bf16 = model.to(torch.bfloat16)(**batch).logits
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), fp32, rtol=0.05, atol=0.05)


@pytest.mark.gpu
def test_cuda_forward_backward_matches_cpu():
    if not torch.cuda.is_available():
        pytest.fail("the gpu marker needs a CUDA device")
    model = build("moetune")
    batch = random_batch(batch=2, length=16)
    cpu = model(**batch).logits
    cuda_model = model.to("cuda")
    out = cuda_model(**{k: v.cuda() for k, v in batch.items()})
    out.loss.backward()
    torch.testing.assert_close(out.logits.cpu(), cpu, rtol=1e-3, atol=1e-3)
