"""Tiny models of every supported family, built from configs (no network), shared by all tests.

Each builder returns a seeded, randomly initialised `*ForCausalLM` in fp32 with a few layers and
small widths, so a forward + backward takes milliseconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    GptOssConfig,
    MixtralConfig,
    PreTrainedModel,
    Qwen3MoeConfig,
)

VOCAB = 128


def deepseek_v3_config(**overrides) -> DeepseekV3Config:
    """MLA attention, 1 leading dense layer, 8 routed experts (top-2) + 1 shared expert."""
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
        q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        max_position_embeddings=256,
    )  # fmt: skip
    kwargs.update(overrides)
    return DeepseekV3Config(**kwargs)


def qwen3_moe_config(**overrides) -> Qwen3MoeConfig:
    """GQA attention with q/k norms, 8 routed experts (top-2), no shared expert."""
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_experts=8, num_experts_per_tok=2, max_position_embeddings=256,
    )  # fmt: skip
    kwargs.update(overrides)
    return Qwen3MoeConfig(**kwargs)


def mixtral_config(**overrides) -> MixtralConfig:
    """GQA attention, 4 routed experts (top-2)."""
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=256,
    )  # fmt: skip
    kwargs.update(overrides)
    return MixtralConfig(**kwargs)


def gpt_oss_config(**overrides) -> GptOssConfig:
    """GQA attention with sinks, alternating sliding / full layers, 4 routed experts (top-2) whose
    fused `gate_up_proj` is stored transposed [E, in, 2I] with gate and up interleaved along 2I."""
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=256, sliding_window=8,
        rope_parameters={"rope_type": "default", "rope_theta": 150000.0},  # no YaRN at this length
    )  # fmt: skip
    kwargs.update(overrides)
    return GptOssConfig(**kwargs)


def moetune_config(**overrides):
    """The built-in architecture at its `tiny` preset, with the shared test vocabulary."""
    from finetune.modeling import preset_config

    overrides.setdefault("vocab_size", VOCAB)
    return preset_config("tiny", **overrides)


CONFIGS = {
    "moetune": moetune_config,
    "deepseek_v3": deepseek_v3_config,
    "qwen3_moe": qwen3_moe_config,
    "mixtral": mixtral_config,
    "gpt_oss": gpt_oss_config,
}
# The families every adapter test runs on. GPT-OSS (interleaved gate/up, expert biases, attention
# sinks) is built for the serving-export tests only: EXPORT_FAMILIES.
FAMILIES = ("moetune", "deepseek_v3", "qwen3_moe", "mixtral")
EXPORT_FAMILIES = (*FAMILIES, "gpt_oss")


def build(family: str, seed: int = 0, **overrides) -> PreTrainedModel:
    """A seeded random-init causal LM of `family` (a key of CONFIGS), in fp32, eval mode."""
    import finetune  # noqa: F401  (registers the built-in architecture with the Auto classes)

    config = CONFIGS[family](**overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Routers of some families are zero-initialised; give them a real spread so routing matters.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight") and param.abs().sum() == 0:
                param.normal_(0.0, 0.5)
    return model.eval()


def save(family: str, folder: str | Path, seed: int = 0, **overrides) -> Path:
    """Build a tiny `family` model and save it (safetensors + config) to `folder`."""
    model = build(family, seed=seed, **overrides)
    folder = Path(folder)
    model.save_pretrained(folder)
    return folder


def synthetic_experts(
    has_gate: bool, transposed: bool, has_bias: bool, *, num_experts: int, hidden: int, width: int
) -> torch.nn.Module:
    """A transformers fused-experts module of any layout: gated `gate_up_proj` or ungated `up_proj`,
    [E, out, in] or transposed [E, in, out], with or without biases (random values, fp32)."""
    from torch import nn
    from transformers.integrations import use_experts_implementation

    class _Config:
        _experts_implementation = "grouped_mm"
        hidden_act = "silu"

    @use_experts_implementation(is_transposed=transposed, has_bias=has_bias, has_gate=has_gate)
    class SyntheticExperts(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = num_experts
            up = 2 * width if has_gate else width
            name = "gate_up_proj" if has_gate else "up_proj"
            up_shape = (num_experts, hidden, up) if transposed else (num_experts, up, hidden)
            down_shape = (num_experts, width, hidden) if transposed else (num_experts, hidden, width)
            setattr(self, name, nn.Parameter(0.3 * torch.randn(up_shape)))
            self.down_proj = nn.Parameter(0.3 * torch.randn(down_shape))
            if has_bias:
                setattr(self, f"{name}_bias", nn.Parameter(0.1 * torch.randn(num_experts, up)))
                self.down_proj_bias = nn.Parameter(0.1 * torch.randn(num_experts, hidden))
            self.act_fn = nn.SiLU()

    return SyntheticExperts(_Config())


def random_batch(batch: int = 2, length: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def reference_experts_forward(experts, hidden_states, top_k_index, top_k_weights, lora):
    """The routed expert MLP with LoRA, token by token with dense W + s·B·A per expert: slow, obviously
    right; the reference `adapters.experts.routed_experts_forward` is checked against.

    `lora` maps parameter names to `adapters.experts.ExpertLora` (a mask leaves experts out)."""
    transposed = getattr(experts, "is_transposed", False)
    has_gate = getattr(experts, "has_gate", True)
    has_bias = getattr(experts, "has_bias", False)
    up_name = "gate_up_proj" if has_gate else "up_proj"

    def weight(name, e):
        w = getattr(experts, name)[e]
        w = w.t() if transposed else w  # (out, in)
        if name in lora and (lora[name].mask is None or lora[name].mask[e]):
            f = lora[name]
            w = w + f.scaling * f.lora_b[e] @ f.lora_a[e]
        return w

    out = torch.zeros_like(hidden_states, dtype=torch.promote_types(hidden_states.dtype, top_k_weights.dtype))
    for t in range(hidden_states.shape[0]):
        for j in range(top_k_index.shape[1]):
            e = int(top_k_index[t, j])
            y = F.linear(hidden_states[t], weight(up_name, e))
            if has_bias:
                y = y + getattr(experts, f"{up_name}_bias")[e]
            y = experts._apply_gate(y[None])[0] if has_gate else experts.act_fn(y)
            y = F.linear(y, weight("down_proj", e))
            if has_bias:
                y = y + experts.down_proj_bias[e]
            out[t] = out[t] + top_k_weights[t, j] * y
    return out.to(hidden_states.dtype)


# ----------------------------------------------------------------------------- routed experts: inputs


# (has_gate, transposed, has_bias) of every synthetic experts layout, and their test ids
EXPERT_LAYOUTS = [(g, t, b) for g in (True, False) for t in (False, True) for b in (False, True)]
EXPERT_LAYOUT_IDS = [
    f"{'gated' if g else 'ungated'}-{'T' if t else 'oi'}-{'bias' if b else 'nobias'}"
    for g, t, b in EXPERT_LAYOUTS
]


def expert_routing(n: int, num_experts: int, k: int = 2, skip: tuple[int, ...] = (4,)):
    """Top-k routing of n tokens over `num_experts` that never picks the experts in `skip` (no tokens)."""
    logits = torch.randn(n, num_experts)
    logits[:, list(skip)] = -1e9
    weights, index = logits.softmax(-1).topk(k, dim=-1)
    return index, weights


def expert_lora(experts, rank: int, mask=None, scale: float = 0.3) -> dict:
    """Random LoRA factors (leaves that require grad, scaling 2) for both projections of `experts`."""
    from adapters.experts import ExpertLora

    out = {}
    for name in ("gate_up_proj" if experts.has_gate else "up_proj", "down_proj"):
        num, first, second = getattr(experts, name).shape
        d_in, d_out = (first, second) if experts.is_transposed else (second, first)
        a = (scale * torch.randn(num, rank, d_in)).requires_grad_()
        b = (scale * torch.randn(num, d_out, rank)).requires_grad_()
        out[name] = ExpertLora(a, b, 2.0, mask)
    return out


def experts_output_and_grads(forward, experts, x, index, weights, lora, probe):
    """`forward(experts, x, index, weights, lora)` and the gradients of <output, probe> for x, the
    routing weights and every LoRA factor (in that order)."""
    leaves = [x, weights] + [t for f in lora.values() for t in (f.lora_a, f.lora_b)]
    out = forward(experts, x, index, weights, lora)
    return out, torch.autograd.grad((out * probe).sum(), leaves)
