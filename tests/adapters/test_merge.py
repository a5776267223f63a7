"""`merge_into_base` / `verify_merge`: the streaming merge equals PEFT's merge_and_unload, on every family.

Adapters are made with plain PEFT (attention via target_modules, fused experts via
target_parameters, lora_B randomised so the delta is not zero) and saved with save_pretrained,
so the merge relies on nothing but the PEFT file format.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from adapters.errors import MoetuneError
from adapters.merge import merge_into_base
from adapters.merge_verify import verify_merge
from adapters.safetensors_io import parse_size
from tests.helpers import models as tiny_models

# PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing` in PeftModel.__init__.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ATTENTION = {
    "deepseek_v3": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
}
# Linear MLPs besides the routed experts. moetune: as target_modules (PEFT lora.Linear). DeepSeek-V3:
# PEFT 0.21 rewrites gate/up/down_proj target_modules into the fused experts for v5 MoE families, so
# (as moetune's apply_lora does) its shared experts and dense layer 0 are 2D target_parameters.
DENSE_MODULES = {
    "moetune": ["shared_experts.gate_proj", "shared_experts.up_proj", "shared_experts.down_proj"]
}
DENSE_PARAMETERS = {
    "deepseek_v3": [
        f"{where}.{proj}.weight"
        for where in ("shared_experts", "layers.0.mlp")
        for proj in ("gate_proj", "up_proj", "down_proj")
    ]
}


def lora_config(family: str, r: int = 4, **kwargs) -> LoraConfig:
    return LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=ATTENTION.get(family, ["q_proj", "k_proj", "v_proj", "o_proj"])
        + DENSE_MODULES.get(family, []),
        target_parameters=EXPERTS + DENSE_PARAMETERS.get(family, []),
        **kwargs,
    )


def make_adapter(family: str, folder: Path, seed: int = 1, scale: float = 0.05, **model_overrides) -> Path:
    """A PEFT adapter on the tiny `family` model with random (non-zero) lora_A and lora_B."""
    model = get_peft_model(tiny_models.build(family, **model_overrides), lora_config(family))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    model.save_pretrained(folder)
    return folder


def reference_merge(base: Path, adapter: Path, dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload()


def checkpoint_layout(folder: Path) -> dict[str, tuple]:
    layout = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118  (safe_open is not iterable)
                piece = f.get_slice(key)
                layout[key] = (file.name, tuple(piece.get_shape()), piece.get_dtype())
    return layout


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_merge_equals_peft_merge_and_unload(family, tmp_path):
    base = tiny_models.save(family, tmp_path / "base")
    (base / "tokenizer.json").write_text('{"version": "1.0"}')  # side files travel with the weights
    (base / "tokenizer_config.json").write_text("{}")
    adapter = make_adapter(family, tmp_path / "adapter")
    report = merge_into_base(base, adapter, tmp_path / "merged")

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    expected = reference_merge(base, adapter)
    original = AutoModelForCausalLM.from_pretrained(base).state_dict()
    got, want = merged.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
    changed = {k for k in want if not torch.equal(want[k], original[k])}
    assert any("experts.gate_up_proj" in k for k in changed) and any(
        "experts.down_proj" in k for k in changed
    )
    assert any("attn" in k for k in changed)
    if family in ("moetune", "deepseek_v3"):
        assert any("shared_experts" in k for k in changed)
    if family == "deepseek_v3":
        assert "model.layers.0.mlp.gate_proj.weight" in changed  # the leading dense layer

    # same keys, shapes, dtypes and files as the base checkpoint (per-expert tensors stay per expert)
    assert checkpoint_layout(tmp_path / "merged") == checkpoint_layout(base)
    batch = tiny_models.random_batch()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected(**batch).logits, rtol=1e-4, atol=1e-5)
    assert report.parameters["routed experts"] > 0 and report.parameters["attention"] > 0
    assert report.output == tmp_path / "merged" and report.files == 1 and report.verify is None
    assert "routed experts" in str(report) and "attention" in str(report) and "float32" in str(report)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "merged" / name).read_bytes() == (base / name).read_bytes()
    card = (tmp_path / "merged" / "README.md").read_text()
    assert (
        card.startswith("---\nlibrary_name: transformers")
        and "# merged\n" in card
        and "## Merge details" in card
    )
    assert json.loads((tmp_path / "merged" / "config.json").read_text()) == json.loads(
        (base / "config.json").read_text()
    )


def test_sharded_base_streams_shard_by_shard_and_reshards(tmp_path):
    base = tmp_path / "base"
    tiny_models.build("qwen3_moe").save_pretrained(base, max_shard_size="60KB")
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) >= 3
    adapter = make_adapter("qwen3_moe", tmp_path / "adapter")

    merge_into_base(base, adapter, tmp_path / "same")
    assert sorted(p.name for p in (tmp_path / "same").glob("*.safetensors")) == shards
    assert checkpoint_layout(tmp_path / "same") == checkpoint_layout(base)
    index = json.loads((tmp_path / "same" / "model.safetensors.index.json").read_text())
    base_index = json.loads((base / "model.safetensors.index.json").read_text())
    assert index == base_index

    merge_into_base(base, adapter, tmp_path / "one", max_shard_size="10GB")
    assert [p.name for p in (tmp_path / "one").glob("*.safetensors")] == ["model.safetensors"]
    assert not (tmp_path / "one" / "model.safetensors.index.json").exists()
    merge_into_base(base, adapter, tmp_path / "small", max_shard_size="30KB")
    assert len(list((tmp_path / "small").glob("*.safetensors"))) > len(shards)

    expected = reference_merge(base, adapter).state_dict()
    for name in ("same", "one", "small"):
        got = AutoModelForCausalLM.from_pretrained(tmp_path / name).state_dict()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)


def test_bf16_merge_states_and_matches_its_rounding(tmp_path):
    base = tmp_path / "base"
    tiny_models.build("moetune").to(torch.bfloat16).save_pretrained(base)
    adapter = make_adapter("moetune", tmp_path / "adapter", scale=0.02)
    report = merge_into_base(base, adapter, tmp_path / "merged")

    line = next(line for line in str(report).splitlines() if "bfloat16" in line)
    assert report.rounding.dtypes == {"BF16"} and report.rounding.max_error > 0
    assert "rounding the merged weights to it changes them by up to" in line and "lost entirely" in line
    error = float(line.split("by up to ")[1].split()[0])
    lost_share = float(line.split("for ")[1].split("%")[0]) / 100
    assert 0 < error < 0.01 and 0 < lost_share < 1

    # each merged weight is exactly round_to_bf16(base + delta), the delta computed in float32
    fp32 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    exact = fp32.merge_and_unload().state_dict()
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16).state_dict()
    worst = 0.0
    for key, value in exact.items():
        assert got[key].dtype == torch.bfloat16
        torch.testing.assert_close(got[key], value.to(torch.bfloat16), rtol=0, atol=0, msg=key)
        worst = max(worst, (got[key].float() - value).abs().max().item())
    assert worst == pytest.approx(error, rel=1e-2)
    assert "bfloat16" in (tmp_path / "merged" / "README.md").read_text()
    # verify runs in float32: the merge's rounding passes, a merge of another adapter does not
    assert str(verify_merge(base, adapter, tmp_path / "merged")).startswith("verify-merge passed")
    other = make_adapter("moetune", tmp_path / "other", seed=9, scale=0.02)
    with pytest.raises(MoetuneError, match="verify-merge failed"):
        verify_merge(base, other, tmp_path / "merged")


def test_verify_passes_on_a_merge_and_fails_on_a_wrong_one(tmp_path):
    base = tiny_models.save("mixtral", tmp_path / "base")
    adapter = make_adapter("mixtral", tmp_path / "adapter")
    report = merge_into_base(base, adapter, tmp_path / "merged", verify=True)
    assert report.verify.passed and report.verify.max_difference <= report.verify.tolerance
    assert "verify-merge passed: max |logit difference|" in str(report)

    other = make_adapter("mixtral", tmp_path / "other", seed=7)
    with pytest.raises(MoetuneError, match="verify-merge failed: max \\|logit difference\\|"):
        verify_merge(base, other, tmp_path / "merged")
    loose = verify_merge(base, other, tmp_path / "merged", tolerance=1e9)
    assert loose.passed and loose.max_difference > 1e-3 and str(loose).startswith("verify-merge passed")


def test_a_failed_merge_leaves_no_output(tmp_path, monkeypatch):
    from adapters import safetensors_io

    base = tiny_models.save("qwen3_moe", tmp_path / "base")
    adapter = make_adapter("qwen3_moe", tmp_path / "adapter")

    def broken(self, tensor):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors_io.ShardWriter, "write_tensor", broken)
    with pytest.raises(OSError, match="disk full"):
        merge_into_base(base, adapter, tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]  # no output, no temporary folder


# ----------------------------------------------------------------------------- bad input: one clear line


def test_adapter_for_another_base_is_refused(tmp_path):
    base = tiny_models.save("qwen3_moe", tmp_path / "base")
    wider = make_adapter("qwen3_moe", tmp_path / "wider", hidden_size=48)
    with pytest.raises(MoetuneError, match=r"does not fit base .*an adapter for another base") as err:
        merge_into_base(base, wider, tmp_path / "out")
    assert "\n" not in str(err.value)
    mixtral = make_adapter("mixtral", tmp_path / "mixtral")
    with pytest.raises(MoetuneError, match="does not fit base"):
        merge_into_base(base, mixtral, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_adapter_targets_that_match_nothing_are_refused(tmp_path):
    base = tiny_models.save("qwen3_moe", tmp_path / "base")
    adapter = make_adapter("qwen3_moe", tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(target_modules=["no_such_proj"], target_parameters=None)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(MoetuneError, match="does not fit base"):
        merge_into_base(base, adapter, tmp_path / "out")


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda base, adapter, out: (base / "config.json").unlink(), "cannot read the architecture"),
        (lambda base, adapter, out: (base / "model.safetensors").rename(base / "pytorch_model.bin"), "pickle file"),
        (lambda base, adapter, out: (adapter / "adapter_model.safetensors").unlink(), "has no adapter_model.safetensors"),
        (lambda base, adapter, out: (adapter / "adapter_config.json").write_text("{oops"), "is not valid JSON"),
        (lambda base, adapter, out: (out.mkdir(), (out / "x").write_text("x")), "already exists and is not empty"),
        (lambda base, adapter, out: _set(adapter, use_dora=True), "uses DoRA"),
        (lambda base, adapter, out: _set(adapter, peft_type="IA3"), "moetune merges LoRA adapters only"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line(tmp_path, setup, message):
    base = tiny_models.save("qwen3_moe", tmp_path / "base")
    adapter = make_adapter("qwen3_moe", tmp_path / "adapter")
    setup(base, adapter, tmp_path / "out")
    with pytest.raises(MoetuneError, match=message) as err:
        merge_into_base(base, adapter, tmp_path / "out")
    assert "\n" not in str(err.value)


def _set(adapter: Path, **values) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(values)
    (adapter / "adapter_config.json").write_text(json.dumps(config))


def test_parse_size():
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("500MB") == 500_000_000
    assert parse_size("1GiB") == 2**30
    assert parse_size("10KB") == 10_000
    assert parse_size(123) == 123
    with pytest.raises(MoetuneError, match="is not a size"):
        parse_size("lots")


def test_cli_merge_and_verify_merge(tmp_path, capsys):
    import cli

    base = tiny_models.save("moetune", tmp_path / "base")
    adapter = make_adapter("moetune", tmp_path / "adapter")
    out = tmp_path / "merged"
    assert cli.main(["merge", str(base), "--adapter", str(adapter), "--output", str(out), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert f"-> {out}" in printed and "verify-merge passed" in printed
    assert cli.main(["verify-merge", str(base), "--adapter", str(adapter), "--merged", str(out)]) == 0
    assert capsys.readouterr().out.startswith("verify-merge passed")

    other = make_adapter("moetune", tmp_path / "other", seed=5)
    args = ["verify-merge", str(base), "--adapter", str(other), "--merged", str(out), "--tolerance", "1e-6"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "verify-merge failed" in err
    wrong = make_adapter("qwen3_moe", tmp_path / "wrong")
    assert cli.main(["merge", str(base), "--adapter", str(wrong), "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not fit base" in err
