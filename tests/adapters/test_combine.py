"""`combine_adapters`: every method against an explicit reference computed here, experts included.

The deltas are read back through PEFT itself (`PeftModel.from_pretrained` + `get_delta_weight` on
each LoRA layer), for the sources and for the combined adapter, so the check covers the file layout
too: a combined adapter that PEFT read differently from what moetune meant would fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import LoraLayer

import cli
from adapters.combine import combine_adapters, dare_seed
from adapters.errors import MoetuneError
from tests.helpers import models as tiny_models

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    # PEFT's own note when it reloads its converted Qwen3-MoE config (gate_up_proj rank_pattern)
    pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match:RuntimeWarning"),
]

# moetune: experts as target_parameters + attention and shared experts as Linear targets.
# qwen3_moe: gate/up/down_proj target_modules, which PEFT 0.21 turns into the fused expert tensors
# with a doubled rank for gate_up_proj (rank_pattern): the rank resolution is exercised too.
SETUPS = {
    "moetune": dict(
        target_modules=["q_proj", "o_proj", "shared_experts.up_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    ),
    "qwen3_moe": dict(target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]),
}
WEIGHTS = [0.7, -0.4]
DENSITY = 0.4


def make_adapter(family: str, folder: Path, seed: int, r: int, **overrides) -> Path:
    config = LoraConfig(r=r, lora_alpha=3 * r, **{**SETUPS[family], **overrides})
    model = get_peft_model(tiny_models.build(family), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    model.save_pretrained(folder)
    return folder


def peft_deltas(family: str, adapter: Path) -> dict[str, tuple[torch.Tensor, int]]:
    """{saved module path: (delta (E, out, in) in float64, rank)} as PEFT computes them."""
    model = PeftModel.from_pretrained(tiny_models.build(family), adapter)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            delta = module.get_delta_weight("default").double()
            out[name] = (delta if delta.dim() == 3 else delta[None], module.r["default"])
    return out


def truncate(delta: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return (u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :]


def topk_trim(t: torch.Tensor, density: float) -> torch.Tensor:
    k = int(density * t.numel())
    keep = torch.zeros(t.numel(), dtype=torch.bool)
    keep[t.abs().flatten().topk(k).indices] = True
    return t * keep.view_as(t)


def elect_and_merge(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """TIES: the sign of the summed (unweighted) values wins; average the weighted values that agree."""
    stack = torch.stack(tensors)
    sign = torch.where(stack.sum(0) >= 0, 1.0, -1.0)
    agree = (stack.sign() == sign).double()
    weighted = torch.stack([w * t for w, t in zip(weights, tensors)])
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1.0)


def dare_masks(key: str, expert: int, shape, n: int, seed: int) -> list[torch.Tensor]:
    torch.manual_seed(dare_seed(seed, key, expert))
    return [torch.bernoulli(torch.full(shape, DENSITY)).double() for _ in range(n)]


def reference(method: str, key: str, deltas: list[torch.Tensor], ranks: list[int], seed: int) -> torch.Tensor:
    if method == "linear":
        return sum(w * d for w, d in zip(WEIGHTS, deltas))
    if method == "svd":
        return truncate(sum(w * d for w, d in zip(WEIGHTS, deltas)), max(ranks))
    merged = torch.empty_like(deltas[0])
    for e in range(merged.shape[0]):  # per expert
        per = [d[e] for d in deltas]
        if method == "ties":
            merged[e] = elect_and_merge([topk_trim(t, DENSITY) for t in per], WEIGHTS)
            continue
        masks = dare_masks(key, e, per[0].shape, len(per), seed)
        dropped = [t * m / DENSITY for t, m in zip(per, masks)]
        if method == "dare_linear":
            merged[e] = sum(w * t for w, t in zip(WEIGHTS, dropped))
        else:  # dare_ties
            merged[e] = elect_and_merge(dropped, WEIGHTS)
    return truncate(merged, max(ranks))


@pytest.fixture(scope="module", params=list(SETUPS))
def pair(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    a = make_adapter(family, root / "a", seed=1, r=4)
    b = make_adapter(family, root / "b", seed=2, r=2)
    return family, root, a, b, peft_deltas(family, a), peft_deltas(family, b)


@pytest.mark.parametrize("method", ["linear", "svd", "ties", "dare_linear", "dare_ties"])
def test_each_method_matches_its_reference(pair, method):
    family, root, a, b, deltas_a, deltas_b = pair
    out = root / f"combined-{method}"
    report = combine_adapters([a, b], out, method=method, weights=WEIGHTS, density=DENSITY, seed=3)
    assert method in str(report) and (report.method, report.output) == (method, out)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == report.rank

    got = peft_deltas(family, out)  # the combined adapter, as plain PEFT reads it
    assert got.keys() == deltas_a.keys()
    experts = 0
    for key, (delta, _) in got.items():
        (da, ra), (db, rb) = deltas_a[key], deltas_b[key]
        want = reference(method, key, [da, db], [ra, rb], seed=3)
        scale = want.abs().max().item()
        torch.testing.assert_close(delta, want, rtol=1e-4, atol=1e-4 * scale, msg=f"{method} {key}")
        experts += delta.shape[0] > 1
    assert experts == 4  # 2 layers x (gate_up_proj, down_proj), merged per expert

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] and not config["rank_pattern"] and not config["use_rslora"]
    expected_rank = {"linear": 6} if family == "moetune" else {"linear": 12}  # qwen: gate_up 8 + 4
    assert config["r"] == expected_rank.get(method, 4 if family == "moetune" else 8)
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and f"method: {method}" in card


def test_linear_is_exactly_both_adapters_at_once(pair):
    """Weights 1, 1: the combined adapter's outputs are those of the model with both deltas added."""
    family, root, a, b, deltas_a, deltas_b = pair
    out = root / "sum"
    combine_adapters([a, b], out, method="linear")
    batch = tiny_models.random_batch()
    both = PeftModel.from_pretrained(tiny_models.build(family), a).merge_and_unload()
    both = PeftModel.from_pretrained(both, b).merge_and_unload()
    combined = PeftModel.from_pretrained(tiny_models.build(family), out)
    with torch.no_grad():
        torch.testing.assert_close(combined(**batch).logits, both(**batch).logits, rtol=1e-4, atol=1e-5)


def test_dare_depends_on_the_seed_only(pair):
    family, root, a, b, *_ = pair
    for name, seed in (("s1", 1), ("s1-again", 1), ("s2", 2)):
        combine_adapters([a, b], root / name, method="dare_linear", seed=seed)
    same = [(root / n / "adapter_model.safetensors").read_bytes() for n in ("s1", "s1-again", "s2")]
    assert same[0] == same[1] and same[0] != same[2]


# ----------------------------------------------------------------------------- refusals: one clear line


def _edit(adapter: Path, **values) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(values)
    (adapter / "adapter_config.json").write_text(json.dumps(config))


def test_adapters_of_different_bases_are_refused(tmp_path):
    a = make_adapter("moetune", tmp_path / "a", seed=1, r=4)
    b = make_adapter("moetune", tmp_path / "b", seed=2, r=4)
    _edit(a, base_model_name_or_path="org/base-one")
    _edit(b, base_model_name_or_path="org/base-two")
    with pytest.raises(MoetuneError, match="trained on different bases: .*'org/base-one'.*'org/base-two'"):
        combine_adapters([a, b], tmp_path / "out", method="linear")

    wide = tmp_path / "wide"
    config = LoraConfig(r=4, **SETUPS["moetune"])
    get_peft_model(tiny_models.build("moetune", hidden_size=32), config).save_pretrained(wide)
    _edit(wide, base_model_name_or_path="org/base-one")
    with pytest.raises(MoetuneError, match="do not fit the same base"):
        combine_adapters([a, wide], tmp_path / "out", method="linear")
    assert not (tmp_path / "out").exists()


def test_adapters_with_different_targets_are_refused(tmp_path):
    a = make_adapter("moetune", tmp_path / "a", seed=1, r=4)
    b = make_adapter("moetune", tmp_path / "b", seed=2, r=4, target_modules=["q_proj"])
    with pytest.raises(MoetuneError, match="different targets: .*target_modules") as err:
        combine_adapters([a, b], tmp_path / "out", method="svd")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(method="mean"),
            "unknown method 'mean'; choose one of linear, ties, dare_linear, dare_ties, svd",
        ),
        (dict(method="linear", weights=[1.0]), "--weights needs 2 finite numbers"),
        (dict(method="ties", density=0.0), "--density must be in \\(0, 1\\]"),
        (dict(method="dare_ties", density=1.5), "--density must be in \\(0, 1\\]"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    a = make_adapter("moetune", tmp_path / "a", seed=1, r=2)
    b = make_adapter("moetune", tmp_path / "b", seed=2, r=2)
    with pytest.raises(MoetuneError, match=message):
        combine_adapters([a, b], tmp_path / "out", **kwargs)
    with pytest.raises(MoetuneError, match="at least two adapters"):
        combine_adapters([a], tmp_path / "out", method="linear")


def test_cli_merge_adapters(tmp_path, capsys):
    a = make_adapter("moetune", tmp_path / "a", seed=1, r=2)
    b = make_adapter("moetune", tmp_path / "b", seed=2, r=2)
    argv = ["merge-adapters", "--adapter", str(a), "--adapter", str(b), "--weights", "0.5,0.5"]
    assert cli.main([*argv, "--method", "ties", "--output", str(tmp_path / "out")]) == 0
    assert "combined 2 adapters (ties, weights 0.5, 0.5)" in capsys.readouterr().out
    assert cli.main([*argv, "--method", "ties", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists and is not empty" in err
