"""adapters.peft_format: PEFT's fused-expert layout (split / pack / delta) against PEFT itself, and the
reader that names each saved pair's parameter, rank and scaling."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from peft.tuners.lora.layer import ParamWrapper

import adapters
from adapters import apply_lora
from adapters.errors import MoetuneError
from adapters.peft_format import (
    load_pairs,
    pack_experts,
    read_factors,
    split_experts,
    wrapper_keys,
)
from tests.helpers.models import build

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*_pattern keys did not match any targeted module.*"),
]


def _randomised(model):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    return model


def test_split_gives_peft_delta_per_expert_and_pack_inverts_it():
    model = _randomised(apply_lora(build("qwen3_moe"), targets=["experts"], r=3, alpha=6))
    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper) and m.num_experts > 1]
    assert wrappers
    for wrapper in wrappers:
        lora_a, lora_b = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
        a3, b3 = split_experts(lora_a, lora_b, wrapper.num_experts)
        assert a3.shape == (wrapper.num_experts, 3, lora_a.shape[1])
        want = wrapper.get_delta_weight("default")  # PEFT's own (E, out, in) (or (E, in, out)) delta
        got = wrapper.scaling["default"] * torch.bmm(b3, a3)
        got = got if got.shape == want.shape else got.transpose(1, 2)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        packed_a, packed_b = pack_experts(a3, b3)
        assert torch.equal(packed_a, lora_a) and torch.equal(packed_b, lora_b)


def test_split_views_write_through_to_peft_weights():
    """ESFT zeroing writes through the per-expert views (adapters.inject)."""
    lora_a, lora_b = torch.randn(4 * 2, 5), torch.randn(6, 4 * 2)  # r=2, E=4
    a3, b3 = split_experts(lora_a, lora_b, 4)
    a3[1] = 0
    b3[1] = 0
    assert lora_a[2:4].abs().sum() == 0 and lora_a[[0, 1, 4, 5, 6, 7]].ne(0).all()
    assert lora_b[:, [1, 5]].abs().sum() == 0 and lora_b[:, [0, 2, 3, 4, 6, 7]].ne(0).all()


def test_nested_wrappers_are_named_deepest_first():
    keys = wrapper_keys("model.layers.1.mlp.experts", ["down_proj", "gate_up_proj"])
    assert keys == {
        "gate_up_proj": "base_model.model.model.layers.1.mlp.experts.base_layer",
        "down_proj": "base_model.model.model.layers.1.mlp.experts",
    }


def test_reader_names_each_pair_with_its_rank_and_scaling(tmp_path):
    model = _randomised(
        apply_lora(
            build("qwen3_moe"),
            targets=["attention", "experts"],
            r=4,
            alpha=8,
            group_overrides={"experts": {"r": 2, "alpha": 8}},
        )
    )
    model.save_pretrained(tmp_path / "adapter")
    _, pairs = load_pairs(tmp_path / "adapter")
    peft_wrappers = {
        f"{name.removeprefix('base_model.model.').replace('.base_layer', '')}.{m.parameter_name}": m
        for name, m in model.named_modules()
        if isinstance(m, ParamWrapper)
    }
    expert_pairs = [p for p in pairs.values() if p.param is not None]
    assert {p.param for p in expert_pairs} == set(peft_wrappers)
    for pair in expert_pairs:
        wrapper = peft_wrappers[pair.param]
        assert (pair.rank, pair.scaling, pair.num_experts) == (2, 4.0, wrapper.num_experts)
        assert torch.equal(pair.lora_A, wrapper.lora_A["default"].weight.detach())
    attention = [p for p in pairs.values() if p.param is None]
    assert attention and all((p.rank, p.scaling, p.num_experts) == (4, 2.0, 1) for p in attention)

    factors = read_factors(tmp_path / "adapter")
    assert set(factors.experts) == {p.module for p in expert_pairs}
    assert all(f.rank == 2 for stacks in factors.experts.values() for f in stacks.values())


def test_reader_refuses_a_config_that_does_not_describe_the_weights(tmp_path):
    apply_lora(build("qwen3_moe"), targets=["experts"], r=4).save_pretrained(tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["r"] = 3
    config_file.write_text(json.dumps(config))
    with pytest.raises(MoetuneError, match=r"rank mismatch at model\.layers\.\d+\.mlp\.experts") as err:
        load_pairs(tmp_path / "adapter")
    assert "\n" not in str(err.value)


def test_serving_reader_stays_independent_of_the_writer():
    """The reader re-derives the servers' stacking: it may import no layout code it would check."""
    source = Path(adapters.__file__).with_name("serving_reader.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert {m for m in imported if m.startswith("adapters")} == {"adapters.errors"}
