"""export-adapter: per-expert LoRA pairs (serving layout) and back to PEFT's fused layout, exactly."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora.layer import ParamWrapper
from safetensors.torch import load_file

from adapters import MoetuneError, apply_lora, export_adapter, select_experts
from tests.helpers.models import build, random_batch

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*_pattern keys did not match any targeted module.*"),
]


def _trained_adapter(folder, family="moetune", **kwargs):
    """Random non-zero A and B everywhere, except the experts an ESFT selection left out (kept zero)."""
    model = apply_lora(build(family), targets=["attention", "experts"], r=4, alpha=8, **kwargs)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        selected = {  # wrapper -> (E,) experts with LoRA, read before B (zero at init) is filled
            module: module.lora_A["default"].weight.view(module.num_experts, -1).ne(0).any(1)
            for module in model.modules()
            if isinstance(module, ParamWrapper) and module.num_experts > 1
        }
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        for module, mask in selected.items():
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            a.view(len(mask), -1, a.shape[-1]).mul_(mask[:, None, None])  # (E, r, in)
            b.view(b.shape[0], -1, len(mask)).mul_(mask)  # (out, r, E)
    model.save_pretrained(folder)
    return model


def test_per_expert_pairs_reproduce_each_experts_delta_and_round_trip(tmp_path):
    model = _trained_adapter(tmp_path / "fused", group_overrides={"experts": {"r": 2, "alpha": 8}})
    message = export_adapter(tmp_path / "fused", tmp_path / "per_expert")
    assert (
        "per-expert" in str(message)
        and "48 per-expert LoRA pairs" in str(message)
        and message.details.pairs == 48
    )  # 2 layers x 8 experts x 3 projections
    per_expert = load_file(str(tmp_path / "per_expert" / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "per_expert" / "adapter_config.json").read_text())
    assert not config["target_parameters"]
    assert "model.layers.1.mlp.experts.7.gate_proj" in config["target_modules"]

    layer = model.base_model.model.model.layers[1].mlp.experts  # down_proj wrapper around gate_up_proj
    for wrapper in (layer, layer.base_layer):
        delta = wrapper.get_delta_weight("default")  # (E, out, in), PEFT's own formula
        scaling = wrapper.scaling["default"]
        assert scaling == 4.0  # group override alpha / r = 8 / 2
        half = delta.shape[1] // 2
        for e in range(8):
            prefix = f"base_model.model.model.layers.1.mlp.experts.{e}"
            parts = {"down_proj": slice(None)} if wrapper.parameter_name == "down_proj" else {
                "gate_proj": slice(0, half), "up_proj": slice(half, None)}  # fmt: skip
            for proj, rows in parts.items():
                a, b = (
                    per_expert[f"{prefix}.{proj}.lora_A.weight"],
                    per_expert[f"{prefix}.{proj}.lora_B.weight"],
                )
                torch.testing.assert_close(scaling * b @ a, delta[e, rows], rtol=1e-5, atol=1e-6)

    export_adapter(tmp_path / "per_expert", tmp_path / "back", fmt="peft")
    original = load_file(str(tmp_path / "fused" / "adapter_model.safetensors"))
    rebuilt = load_file(str(tmp_path / "back" / "adapter_model.safetensors"))
    assert original.keys() == rebuilt.keys()
    for key, tensor in original.items():
        assert torch.equal(rebuilt[key], tensor), key
    batch = random_batch()
    with torch.no_grad():
        want = model.eval()(**batch).logits
        got = PeftModel.from_pretrained(build("moetune"), str(tmp_path / "back")).eval()(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_esft_export_keeps_only_selected_experts(tmp_path):
    _trained_adapter(tmp_path / "all")
    _trained_adapter(tmp_path / "esft", experts={0: [2], 1: [0, 6]})
    export_adapter(tmp_path / "all", tmp_path / "all_pe")
    message = export_adapter(tmp_path / "esft", tmp_path / "esft_pe")
    assert message.details.left_out == 26  # 2 weights x (7 + 6)
    assert "26 (weight, expert) pairs without LoRA left out" in str(message)
    keys = load_file(str(tmp_path / "esft_pe" / "adapter_model.safetensors")).keys()
    experts = {k.split(".experts.")[1].split(".")[0] for k in keys if ".experts." in k}
    assert experts == {"0", "2", "6"}
    size = (tmp_path / "esft_pe" / "adapter_model.safetensors").stat().st_size
    assert size < 0.5 * (tmp_path / "all_pe" / "adapter_model.safetensors").stat().st_size
    export_adapter(tmp_path / "esft_pe", tmp_path / "esft_back", fmt="peft")
    original = load_file(str(tmp_path / "esft" / "adapter_model.safetensors"))
    rebuilt = load_file(str(tmp_path / "esft_back" / "adapter_model.safetensors"))
    assert all(torch.equal(rebuilt[k], v) for k, v in original.items())


def test_export_refuses_bad_input(tmp_path):
    with pytest.raises(MoetuneError, match="not an adapter folder"):
        export_adapter(tmp_path, tmp_path / "out")
    model = apply_lora(build("moetune"), targets=["attention"], r=2)
    model.save_pretrained(tmp_path / "attn")
    with pytest.raises(MoetuneError, match="no expert"):
        export_adapter(tmp_path / "attn", tmp_path / "out")
    with pytest.raises(MoetuneError, match="--format"):
        export_adapter(tmp_path / "attn", tmp_path / "out", fmt="gguf")
    with pytest.raises(MoetuneError, match="only folders written by --format per-expert"):
        export_adapter(tmp_path / "attn", tmp_path / "out", fmt="peft")
    assert not (tmp_path / "out").exists()


def test_select_experts_reaches_the_threshold_in_score_order():
    scores = {3: [0.1, 0.5, 0.0, 0.3, 0.1], 5: [0, 0, 0, 0, 0]}
    assert select_experts(scores, 0.5) == {3: [1], 5: []}
    assert select_experts(scores, 0.6) == {3: [1, 3]} | {5: []}
    assert select_experts(scores, 1.0)[3] == [0, 1, 3, 4]  # the zero-score expert is never needed
    assert select_experts({0: [2.0, 2.0, 4.0]}, 0.6) == {0: [0, 2]}  # ties: lower id first
    with pytest.raises(MoetuneError, match="threshold"):
        select_experts(scores, 0.0)


def test_export_keeps_non_expert_parameter_targets(tmp_path):
    """A router adapted as a 2D parameter (DeepSeek-V3, router: lora) stays a parameter target."""
    model = apply_lora(build("deepseek_v3"), targets=["experts"], router="lora", r=4)
    model.save_pretrained(tmp_path / "fused")
    export_adapter(tmp_path / "fused", tmp_path / "pe")
    config = json.loads((tmp_path / "pe" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["model.layers.1.mlp.gate.weight"]
    export_adapter(tmp_path / "pe", tmp_path / "back", fmt="peft")
    original = load_file(str(tmp_path / "fused" / "adapter_model.safetensors"))
    rebuilt = load_file(str(tmp_path / "back" / "adapter_model.safetensors"))
    assert original.keys() == rebuilt.keys() and all(torch.equal(rebuilt[k], v) for k, v in original.items())
    back = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert set(back["target_parameters"]) == set(
        json.loads((tmp_path / "fused" / "adapter_config.json").read_text())["target_parameters"]
    )
