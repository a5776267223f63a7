"""export-adapter --format vllm|sglang and verify-export: layouts per family, checked numerically.

The round trips go export -> the independent reader (adapters.serving_reader, the servers' stacking
rules) -> base + deltas, and compare logits with PEFT's base + adapter in float32.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora.layer import ParamWrapper
from safetensors.torch import load_file, save_file

import cli
from adapters import MoetuneError, apply_lora
from adapters import serving_layouts as layouts
from adapters.export import export_adapter
from adapters.serving_verify import check_export, verify_export
from tests.helpers.models import EXPORT_FAMILIES, build, random_batch, save

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*_pattern keys did not match any targeted module.*"),
]

# ESFT-style selections: the MoE layers of each tiny family (DeepSeek-V3's layer 0 is dense)
SELECTIONS = {"moetune": {0: [1], 1: [0, 6]}, "deepseek_v3": {1: [2, 5]}}
DEFAULT_SELECTION = {0: [1], 1: [0, 3]}
PER_EXPERT_KEY = re.compile(
    r"^base_model\.model\.(?P<ffn>.+)\.experts\.(?P<e>\d+)\.(?P<proj>[^.]+)\.lora_[AB]\.weight$"
)


def trained_adapter(folder, family, selection=None, **kwargs):
    """A saved adapter with random, clearly non-zero factors; ESFT-unselected experts stay exactly zero."""
    model = apply_lora(
        build(family), targets=["attention", "experts"], r=4, alpha=8, experts=selection, **kwargs
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        keep = {}
        for name, module in model.named_modules():
            if isinstance(module, ParamWrapper) and module.num_experts > 1:
                a = module.lora_A["default"].weight
                keep[name] = a.view(module.num_experts, -1).ne(0).any(1)  # (E,) selected experts
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
        for name, mask in keep.items():
            module = model.get_submodule(name)
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            a.view(len(mask), -1, a.shape[-1]).mul_(mask[:, None, None])  # (E, r, in)
            b.view(b.shape[0], -1, len(mask)).mul_(mask)  # (out, r, E)
    model.save_pretrained(folder)
    return model


def expert_layers(family):
    """Decoder layers with routed experts in the tiny model of `family`."""
    return [i for i, layer in enumerate(build(family).model.layers) if hasattr(layer.mlp, "experts")]


def selection_for(family):
    return SELECTIONS.get(family, DEFAULT_SELECTION)


CASES = [("vllm", f, sel) for f in EXPORT_FAMILIES for sel in ("full", "esft")]
CASES += [("sglang", f, "esft") for f in EXPORT_FAMILIES]


@pytest.mark.parametrize("target, family, selection", CASES)
def test_export_reads_back_to_base_plus_adapter(tmp_path, target, family, selection):
    base = save(family, tmp_path / "base")
    chosen = selection_for(family) if selection == "esft" else None
    overrides = {"experts": {"r": 2, "alpha": 8}} if selection == "full" else None  # ranks 4 and 2
    model = trained_adapter(tmp_path / "adapter", family, chosen, group_overrides=overrides)
    message = export_adapter(tmp_path / "adapter", tmp_path / "out", target, base=base)
    assert message.details.rank == 4 and message.details.target == target
    assert "rank 4 everywhere" in str(message) and "--max-lora-rank" in str(message)

    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (
        config["r"] == config["lora_alpha"] == 4
        and not config["rank_pattern"]
        and not config["alpha_pattern"]
    )
    weights = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    fused_key = re.compile(r"\.experts(\.base_layer)?\.lora_A\.")
    assert all(w.shape[0] == 4 for k, w in weights.items() if ".lora_A." in k and not fused_key.search(k))
    layers = expert_layers(family)
    num_experts = build(family).model.layers[layers[-1]].mlp.experts.gate_up_proj.shape[0]
    if layouts.layout_of(layouts.FAMILIES[family], target) == layouts.FUSED:
        for layer in layers:
            for part in (".base_layer", ""):
                assert weights[
                    f"base_model.model.model.layers.{layer}.mlp.experts{part}.lora_A.weight"
                ].shape[0] == (4 * num_experts)
    else:  # every expert of every MoE layer, with all three projections
        found = {}
        for key in weights:
            match = PER_EXPERT_KEY.match(key)
            if match:
                found.setdefault(match["ffn"], set()).add((int(match["e"]), match["proj"]))
        names = (
            layouts.FAMILIES[family].vllm_names if target == "vllm" else ("gate_proj", "up_proj", "down_proj")
        )
        ffn = layouts.FAMILIES[family].vllm_ffn if target == "vllm" else "mlp"
        assert set(found) == {f"model.layers.{layer}.{ffn}" for layer in layers}
        assert all(pairs == {(e, p) for e in range(num_experts) for p in names} for pairs in found.values())

    check = check_export(tmp_path / "out", base, tmp_path / "adapter")
    assert check.passed and str(check).startswith("PASS")
    assert check.max_abs <= 1e-5 * max(1.0, check.scale), str(check)  # <= 1e-5 relative, float32
    with torch.no_grad():  # ... while the adapter itself moves the logits far more than that
        batch = random_batch()
        effect = (model.eval()(**batch).logits - build(family)(**batch).logits).abs().max()
    assert effect > 1e-3


def test_each_family_gets_its_layout_and_its_gate_up_order_from_transformers():
    """The table's gate/up order is what transformers' own experts module declares (is_concatenated)."""
    assert set(layouts.FAMILIES) == set(EXPORT_FAMILIES)
    for family in EXPORT_FAMILIES:
        experts = build(family).model.layers[expert_layers(family)[0]].mlp.experts
        expected = layouts.CONCATENATED if experts.is_concatenated else layouts.INTERLEAVED
        assert layouts.FAMILIES[family].gate_up == expected, family
        assert layouts.layout_of(layouts.FAMILIES[family], "sglang") == layouts.PER_EXPERT
    vllm = {f: layouts.layout_of(layouts.FAMILIES[f], "vllm") for f in EXPORT_FAMILIES}
    assert vllm == {f: layouts.FUSED if f == "gpt_oss" else layouts.PER_EXPERT for f in EXPORT_FAMILIES}


@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_moe"])
def test_gate_and_up_rows_follow_the_family_and_a_wrong_order_fails_verification(
    tmp_path, monkeypatch, family
):
    base = save(family, tmp_path / "base")
    model = trained_adapter(tmp_path / "adapter", family)
    export_adapter(tmp_path / "adapter", tmp_path / "out", "sglang", base=base)
    weights = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    layer = expert_layers(family)[0]
    wrapper = model.base_model.model.model.layers[layer].mlp.experts.base_layer  # gate_up_proj
    scaling = wrapper.scaling["default"]
    b = wrapper.lora_B["default"].weight.view(wrapper.out_features, 4, -1).permute(2, 0, 1)  # (E, 2I, r)
    prefix = f"base_model.model.model.layers.{layer}.mlp.experts.1"
    gate, up = (b[1, 0::2], b[1, 1::2]) if family == "gpt_oss" else b[1].chunk(2)
    torch.testing.assert_close(weights[f"{prefix}.gate_proj.lora_B.weight"], scaling * gate)
    torch.testing.assert_close(weights[f"{prefix}.up_proj.lora_B.weight"], scaling * up)

    wrong = layouts.INTERLEAVED if family != "gpt_oss" else layouts.CONCATENATED
    family_table = dict(layouts.FAMILIES)
    family_table[family] = layouts.ServingFamily(wrong)
    monkeypatch.setattr(layouts, "FAMILIES", family_table)  # the writer's table only: the reader has none
    export_adapter(tmp_path / "adapter", tmp_path / "wrong", "sglang", base=base)
    with pytest.raises(MoetuneError, match="^FAIL: ") as err:
        verify_export(tmp_path / "wrong", base, tmp_path / "adapter")
    assert "\n" not in str(err.value)


def test_left_out_experts_get_zero_b_and_a_fresh_a_selected_ones_keep_theirs(tmp_path):
    base = save("mixtral", tmp_path / "base")
    model = trained_adapter(tmp_path / "adapter", "mixtral", {1: [2]})
    message = export_adapter(tmp_path / "adapter", tmp_path / "out", "vllm", base=base)
    # layer 0 is not in the selection (no expert LoRA at all); in layer 1, 3 experts x 2 weights are empty
    assert message.details.filled == 6
    assert "6 (weight, expert) pairs without LoRA written as zero B + fresh A" in str(message)
    weights = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    down = model.base_model.model.model.layers[1].mlp.experts  # the outer wrapper: down_proj
    a = down.lora_A["default"].weight.view(4, 4, -1)  # (E, r, in)
    prefix = "base_model.model.model.layers.1.block_sparse_moe.experts"
    torch.testing.assert_close(weights[f"{prefix}.2.w2.lora_A.weight"], a[2])
    for e in (0, 1, 3):
        for proj in ("w1", "w2", "w3"):
            fresh = weights[f"{prefix}.{e}.{proj}.lora_A.weight"]
            assert torch.count_nonzero(weights[f"{prefix}.{e}.{proj}.lora_B.weight"]) == 0
            assert fresh.ne(0).all() and fresh.abs().max() <= fresh.shape[1] ** -0.5  # PEFT's kaiming bound
    export_adapter(tmp_path / "adapter", tmp_path / "again", "vllm", base=base)
    again = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert all(torch.equal(again[k], v) for k, v in weights.items())  # the fresh A is the same every run


def test_fused_vllm_export_is_also_plain_peft_and_rank_can_be_padded(tmp_path):
    """GPT-OSS's vLLM layout is PEFT's own fused one: plain PEFT loads it and gets the same logits."""
    base = save("gpt_oss", tmp_path / "base")
    model = trained_adapter(
        tmp_path / "adapter", "gpt_oss", group_overrides={"experts": {"r": 2, "alpha": 4}}
    )
    message = export_adapter(tmp_path / "adapter", tmp_path / "out", "vllm", base=base, rank=8)
    assert "rank 8 everywhere" in str(message) and "--max-lora-rank 8" in str(message)
    meta = json.loads((tmp_path / "out" / "moetune_export.json").read_text())
    assert (
        meta["layout"] == "fused" and meta["is_3d_lora_weight"] is True and meta["gate_up"] == "interleaved"
    )
    weights = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    a = weights["base_model.model.model.layers.0.mlp.experts.lora_A.weight"].view(4, 8, -1)  # (E, R, in)
    assert torch.count_nonzero(a[:, 2:]) == 0  # rank 2 padded with zero rows
    batch = random_batch()
    with torch.no_grad():
        want = model.eval()(**batch).logits
        got = PeftModel.from_pretrained(build("gpt_oss"), str(tmp_path / "out")).eval()(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(MoetuneError, match="--rank 1 is below the adapter's largest rank 4"):
        export_adapter(tmp_path / "adapter", tmp_path / "low", "vllm", base=base, rank=1)


def test_bad_input_is_one_clear_line(tmp_path):
    base = save("qwen3_moe", tmp_path / "base")
    attention_only = apply_lora(build("qwen3_moe"), targets=["attention"], r=2)
    attention_only.save_pretrained(tmp_path / "attn")
    trained_adapter(tmp_path / "adapter", "qwen3_moe")
    mixtral = save("mixtral", tmp_path / "mixtral")
    fewer = save("qwen3_moe", tmp_path / "fewer", num_experts=4)
    export_adapter(tmp_path / "adapter", tmp_path / "out", "vllm", base=base)
    export_adapter(tmp_path / "adapter", tmp_path / "stored", "per-expert")
    bad_rank = tmp_path / "bad_rank"
    bad_rank.mkdir()
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (bad_rank / "adapter_config.json").write_text(json.dumps(config | {"r": 3}))
    (bad_rank / "adapter_model.safetensors").write_bytes(
        (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    )
    cut = tmp_path / "cut"
    export_adapter(tmp_path / "adapter", cut, "vllm", base=base)
    tensors = load_file(str(cut / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.mlp.experts.3.up_proj.lora_A.weight"
    save_file({**tensors, key: tensors[key][:2].contiguous()}, str(cut / "adapter_model.safetensors"))
    llama_like = tmp_path / "llama"
    llama_like.mkdir()
    (llama_like / "config.json").write_text(json.dumps({"model_type": "llama"}))
    cases = [
        (lambda: export_adapter(tmp_path / "attn", tmp_path / "x", "vllm", base=base), "no expert LoRA"),
        (lambda: export_adapter(bad_rank, tmp_path / "x", "sglang", base=base), "rank mismatch at"),
        (
            lambda: export_adapter(tmp_path / "adapter", tmp_path / "x", "vllm", base=fewer),
            "trained on another base",
        ),
        (
            lambda: export_adapter(tmp_path / "adapter", tmp_path / "x", "vllm", base=llama_like),
            "model_type 'llama'",
        ),
        (
            lambda: export_adapter(tmp_path / "adapter", tmp_path / "x", "vllm", verify=True),
            "--verify needs --base",
        ),
        (
            lambda: export_adapter(tmp_path / "adapter", tmp_path / "x", "peft", rank=8),
            "--rank and --verify apply",
        ),
        (
            lambda: export_adapter(tmp_path / "out", tmp_path / "x", "peft"),
            "only folders written by --format per-expert",
        ),
        (lambda: verify_export(tmp_path / "out", mixtral, tmp_path / "adapter"), "another base"),
        (lambda: verify_export(tmp_path / "out", fewer, tmp_path / "adapter"), "another base"),
        (lambda: verify_export(cut, base, tmp_path / "adapter"), "rank mismatch at"),
        (
            lambda: verify_export(tmp_path / "stored", base, tmp_path / "adapter"),
            "reads vllm / sglang exports",
        ),
    ]
    for call, message in cases:
        with pytest.raises(MoetuneError, match=re.escape(message)) as err:
            call()
        assert "\n" not in str(err.value), str(err.value)
    assert not (tmp_path / "x").exists()
    router_trained = apply_lora(build("qwen3_moe"), targets=["experts"], router="train", r=2)
    router_trained.save_pretrained(tmp_path / "router")
    with pytest.raises(MoetuneError, match="trains whole modules"):
        export_adapter(tmp_path / "router", tmp_path / "x", "vllm", base=base)


def test_cli_export_verify_and_bad_input(tmp_path, capsys):
    base = save("qwen3_moe", tmp_path / "base")
    trained_adapter(tmp_path / "adapter", "qwen3_moe", DEFAULT_SELECTION)
    out = str(tmp_path / "out")
    args = ["export-adapter", str(tmp_path / "adapter"), "--output", out, "--format", "vllm"]
    assert cli.main([*args, "--base", str(base), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "per-expert layout for qwen3_moe" in printed and "\nPASS: " in printed
    assert cli.main(["verify-export", out, "--base", str(base), "--adapter", str(tmp_path / "adapter")]) == 0
    assert capsys.readouterr().out.startswith("PASS: ")
    assert cli.main([*args, "--verify"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moetune: error: --verify needs --base") and err.count("\n") == 1
    with pytest.raises(SystemExit):
        cli.main(["export-adapter", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "compact storage" in help_text and "every expert present" in help_text
