"""Quantized experts modules: the routed computation on quantized weights equals the same computation
on their dequantized values (forward and gradients), only hit experts are dequantized, LoRA trained on
a quantized base is a plain PEFT adapter of the float base."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, GptOssConfig, OlmoeConfig

from adapters import apply_lora, load_adapter
from adapters.errors import MoetuneError
from adapters.expert_fast_path import set_experts_backend
from adapters.experts import ExpertLora, forced_backend, routed_experts_forward
from finetune.quantization import quantize_model_experts_
from finetune.quantization.experts import CODES, SCALES, dequantized_copy, quantize_experts_
from tests.helpers.models import (
    EXPERT_LAYOUT_IDS,
    EXPERT_LAYOUTS,
    FAMILIES,
    build,
    expert_lora,
    expert_routing,
    experts_output_and_grads,
    random_batch,
    reference_experts_forward,
    synthetic_experts,
)

# PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing` in PeftModel.__init__.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

E, H, INTER, R = 6, 12, 8, 3  # 16 x 12 and 12 x 8 experts: NF4 blocks end mid-row and mid-expert
METHODS = ["int8", "nf4"]


def _quantized_pair(has_gate, transposed, has_bias, method):
    """(quantized module, float module holding exactly its dequantized weights)."""
    experts = synthetic_experts(has_gate, transposed, has_bias, num_experts=E, hidden=H, width=INTER)
    quantize_experts_(experts.requires_grad_(False), method)
    return experts, dequantized_copy(experts)


@pytest.fixture(params=["loop", "grouped"])
def backend(request):
    """The per-expert loop (CPU default) and grouped GEMMs over chunks of 2 dequantized experts (CUDA
    default; torch's grouped_mm also runs on the CPU, so the chunked path is checked here too)."""
    with forced_backend(request.param, chunk_bytes=2 * 2 * INTER * H * 4):  # 2 experts of the up projection
        yield request.param


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("has_gate", "transposed", "has_bias"), EXPERT_LAYOUTS, ids=EXPERT_LAYOUT_IDS)
def test_routed_lora_on_quantized_weights_equals_the_dequantized_computation(
    has_gate, transposed, has_bias, method, backend
):
    quantized, plain = _quantized_pair(has_gate, transposed, has_bias, method)
    lora = expert_lora(plain, R)
    index, weights = expert_routing(9, E)
    weights.requires_grad_()
    x = torch.randn(9, H, requires_grad=True)
    probe = torch.randn(9, H)

    got, got_grads = experts_output_and_grads(
        routed_experts_forward, quantized, x, index, weights, lora, probe
    )
    # the reference: dense W + s·B·A per token on the dequantized float module
    want, want_grads = experts_output_and_grads(
        reference_experts_forward, plain, x, index, weights, lora, probe
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    # the module's own forward (no LoRA) is the plain module's
    with torch.no_grad():
        torch.testing.assert_close(
            quantized(x, index, weights), plain(x, index, weights), rtol=1e-5, atol=1e-5
        )


def test_only_hit_experts_are_dequantized_once_forward_and_once_backward(monkeypatch):
    quantized, _ = _quantized_pair(True, False, False, "nf4")
    calls = []
    original = type(quantized).dequantize_expert
    monkeypatch.setattr(
        type(quantized),
        "dequantize_expert",
        lambda self, name, e: calls.append((name, e)) or original(self, name, e),
    )
    lora = expert_lora(quantized, R)
    index, weights = expert_routing(16, E, skip=(1, 4))
    x = torch.randn(16, H, requires_grad=True)
    out = routed_experts_forward(quantized, x, index, weights, lora)
    hit = sorted(set(index.view(-1).tolist()))
    assert sorted(e for _, e in calls) == sorted(hit * 2)  # gate_up and down, each hit expert once
    calls.clear()
    out.square().sum().backward()
    assert sorted(e for _, e in calls) == sorted(hit * 2)  # recomputed in backward, never kept
    assert {1, 4}.isdisjoint(e for _, e in calls)


def test_module_state_is_plain_tensors_and_moves_keep_fp32_scales():
    quantized, _ = _quantized_pair(True, False, True, "nf4")
    state = quantized.state_dict()
    assert set(state) == {
        f"gate_up_proj{CODES}",
        f"gate_up_proj{SCALES}",
        f"down_proj{CODES}",
        f"down_proj{SCALES}",
        "gate_up_proj_bias",
        "down_proj_bias",
    }
    assert all(type(t) is torch.Tensor for t in state.values())  # no tensor subclass
    assert "gate_up_proj" not in dict(quantized.named_parameters())  # no fake parameter outside PEFT's search
    assert quantized.gate_up_proj.shape == (E, 2 * INTER, H) and quantized.gate_up_proj.isnan().all()
    quantized.to(torch.bfloat16)
    assert quantized.compute_dtype == torch.bfloat16 and quantized.gate_up_proj.dtype == torch.bfloat16
    assert (
        quantized.gate_up_proj_qscale.dtype == torch.float32
        and quantized.gate_up_proj_bias.dtype == torch.bfloat16
    )
    assert quantized.dequantize_expert("down_proj", 2).dtype == torch.bfloat16


def _gpt_oss():
    return GptOssConfig(
        vocab_size=128, hidden_size=32, intermediate_size=32, head_dim=8, num_attention_heads=4,
        num_key_value_heads=2, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=256, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip


def _olmoe():
    return OlmoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=16, num_attention_heads=4, num_key_value_heads=4,
        num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
        eos_token_id=1, pad_token_id=0,
    )  # fmt: skip


def _model(family):
    if family in FAMILIES:
        return build(family)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config({"gpt_oss": _gpt_oss, "olmoe": _olmoe}[family]())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 3 or name.endswith(("router.weight", "gate.weight")):
                param.normal_(0.0, 0.3)  # some families start experts / routers at zero
    return model.eval()


def _dequantized_model(quantized, family):
    """The family's float model whose experts hold exactly the quantized model's dequantized weights."""
    plain = _model(family)
    for name, module in quantized.named_modules():
        if hasattr(module, "quantized_shapes"):
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent), child, dequantized_copy(module))
    return plain


ALL_FAMILIES = [*FAMILIES, "gpt_oss", "olmoe"]


def _with_random_lora(base):
    """LoRA on attention + experts with random A and B (PEFT starts B at zero), the same for any base."""
    model = apply_lora(base, targets=["attention", "experts"], r=4, alpha=8)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                gen = torch.Generator().manual_seed(sum(map(ord, name)))
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    return model


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_lora_training_step_on_a_quantized_model_equals_its_dequantized_float_twin(family, method):
    quantized = _model(family)
    assert quantize_model_experts_(quantized, method)
    plain = _dequantized_model(quantized, family)
    batch = random_batch()
    models = []
    for base in (quantized, plain):
        torch.manual_seed(1)
        models.append(
            apply_lora(base, targets=["attention", "experts"], r=4, alpha=8, init_lora_weights="gaussian")
        )
    outs = []
    for model in models:
        out = model(**batch)
        out.loss.backward()
        outs.append((out.logits, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-5)
    assert outs[0][1].keys() == outs[1][1].keys() and any("experts" in n for n in outs[0][1])
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(grad, outs[1][1][name], rtol=1e-3, atol=1e-5, msg=name)
    # the quantized model stays quantized under PEFT: no float expert stack appeared
    assert not any(p.ndim == 3 and "lora" not in n for n, p in models[0].named_parameters())


@pytest.mark.parametrize("family", ["moetune", "qwen3_moe", "gpt_oss"])
def test_adapter_trained_on_a_quantized_base_is_a_plain_peft_adapter_of_the_float_base(tmp_path, family):
    quantized = _model(family)
    quantize_model_experts_(quantized, "nf4")
    dequantized = _dequantized_model(quantized, family)  # float, with the values the quantized model computes
    model = apply_lora(quantized, targets=["attention", "experts"], r=4, alpha=8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = random_batch()
    for _ in range(2):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(tmp_path / "adapter")

    # plain PEFT (no moetune code) on float bases: the original one, and the dequantized one
    on_float = PeftModel.from_pretrained(_model(family), tmp_path / "adapter")
    on_dequantized = PeftModel.from_pretrained(dequantized, tmp_path / "adapter")
    trained = {n: p for n, p in model.named_parameters() if "lora_" in n}
    loaded = {n: p for n, p in on_float.named_parameters() if "lora_" in n}
    assert trained.keys() == loaded.keys() and any("experts" in n for n in trained)
    for name, value in trained.items():
        assert torch.equal(value, loaded[name]), name
        assert value.abs().sum() > 0
    with torch.no_grad():
        want = model(**batch).logits
        torch.testing.assert_close(on_dequantized(**batch).logits, want, rtol=1e-4, atol=1e-5)
        # and moetune loads it back onto a quantized base
        again = _model(family)
        quantize_model_experts_(again, "nf4")
        torch.testing.assert_close(load_adapter(again, tmp_path / "adapter")(**batch).logits, want)


def test_disabled_adapters_give_the_quantized_base_and_two_active_adapters_are_refused():
    model = build("moetune")
    quantize_model_experts_(model, "int8")
    batch = random_batch()
    with torch.no_grad():
        base = model(**batch).logits
    peft_model = _with_random_lora(model)
    with torch.no_grad():
        adapted = peft_model(**batch).logits
        with peft_model.disable_adapter():
            torch.testing.assert_close(peft_model(**batch).logits, base)
    assert not torch.allclose(adapted, base)
    peft_model.base_model.set_adapter(["default"])
    wrapper = next(m for n, m in peft_model.named_modules() if n.endswith("experts") and hasattr(m, "lora_A"))
    wrapper._active_adapter = ["default", "other"]
    wrapper.lora_A["other"] = wrapper.lora_A["default"]
    with pytest.raises(
        NotImplementedError, match="quantized experts runs only through moetune's routed path"
    ):
        peft_model(**batch)


@pytest.mark.parametrize("method", METHODS)
def test_a_range_of_experts_dequantizes_like_each_expert(method):
    quantized, _ = _quantized_pair(True, True, False, method)
    for name in quantized.quantized_shapes:
        got = quantized.dequantize_experts(name, 1, 5)
        want = torch.stack([quantized.dequantize_expert(name, e) for e in range(1, 5)])
        assert torch.equal(got, want)


def test_grouped_backend_is_refused_on_the_cpu_in_one_line():
    model = build("moetune")
    quantize_model_experts_(model, "nf4")
    with pytest.raises(
        MoetuneError, match="'grouped' runs grouped GEMMs on CUDA GPUs, but the experts are on"
    ):
        set_experts_backend(model, "grouped")
    assert set_experts_backend(model, "loop") == 2


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
def test_cuda_chunked_grouped_path_equals_the_loop(method):
    """On a GPU, "auto" takes grouped GEMMs over chunks of dequantized experts; the loop is the reference."""
    quantized, _ = _quantized_pair(True, False, False, method)
    quantized.to("cuda", torch.bfloat16)
    lora = {
        n: ExpertLora(
            f.lora_a.detach().cuda().requires_grad_(), f.lora_b.detach().cuda().requires_grad_(), 2.0
        )
        for n, f in expert_lora(quantized, R).items()
    }
    index, weights = (t.cuda() for t in expert_routing(64, E))
    x = torch.randn(64, H, device="cuda", dtype=torch.bfloat16)
    results = []
    for backend in ("auto", "loop"):
        quantized.experts_backend = backend
        out = routed_experts_forward(quantized, x, index, weights, lora)
        grads = torch.autograd.grad(out.float().square().sum(), [f.lora_a for f in lora.values()])
        results.append((out, grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=2e-2, atol=2e-2)
    for got, want in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("method", METHODS)
def test_quantizing_a_stack_in_chunks_equals_quantizing_it_whole(method, monkeypatch):
    """quantize_weight works through a stack a few experts at a time (bounded fp32 working set) and
    writes each chunk in place; the codes and scales equal one call on the whole stack."""
    from finetune.quantization import experts as quantized_experts
    from finetune.quantization.formats import quantize

    module = synthetic_experts(True, True, False, num_experts=E, hidden=H, width=INTER)
    weight = module.gate_up_proj.detach()  # (E, in, out): transposed storage
    whole = quantize(weight.transpose(1, 2), method)
    monkeypatch.setattr(quantized_experts, "QUANTIZE_CHUNK_BYTES", 4 * 2 * INTER * H * 2)  # 2 experts a chunk
    codes, scales = quantized_experts.quantize_weight(module, weight, method)
    assert torch.equal(codes, whole[0]) and torch.equal(scales, whole[1])
