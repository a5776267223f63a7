"""apply_lora / load_adapter on every tiny family: fast path vs plain PEFT, files both ways, errors."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open

from adapters import (
    MoetuneError,
    apply_lora,
    count_target_groups,
    fast_path_modules,
    load_adapter,
    remove_fast_path,
    target_report,
)
from adapters.targets import find_targets
from tests.helpers.models import FAMILIES, build, random_batch

# PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing` in PeftModel.__init__.
# Plain PEFT loading an adapter with parameter rank patterns warns that they "did not match any module"
# (they are applied all the same; the parity checks below prove it).
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*_pattern keys did not match any targeted module.*"),
]


def _randomise_lora(model, std=0.2, seed=1):
    """LoRA B starts at zero; give every factor values so parity checks see a real delta."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def _assert_plain_peft_reproduces(model, family, folder, batch):
    """Save the adapter and load it with plain PEFT onto a fresh base (no moetune code): same logits."""
    model.save_pretrained(folder)
    with torch.no_grad():
        want = model.eval()(**batch).logits
        got = PeftModel.from_pretrained(build(family), str(folder)).eval()(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), out.logits.detach(), grads


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_path_equals_plain_peft_and_saved_folder_loads_in_plain_peft(family, tmp_path):
    model = apply_lora(build(family), targets=["attention", "experts"], r=4, alpha=8)
    assert fast_path_modules(model), "experts must run the routed path"
    _randomise_lora(model)
    model.train()
    batch = random_batch()
    loss, logits, grads = _loss_and_grads(model, batch)
    assert any(".experts." in n and "lora_A" in n for n in grads)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)  # base frozen

    remove_fast_path(model)
    ref_loss, ref_logits, ref_grads = _loss_and_grads(model, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)

    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["target_parameters"]
    plain = PeftModel.from_pretrained(build(family), str(tmp_path / "adapter")).eval()  # no moetune code
    assert not fast_path_modules(plain)
    with torch.no_grad():
        plain_logits = plain(**batch).logits
    torch.testing.assert_close(plain_logits, ref_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
def test_moetune_loads_an_adapter_trained_by_plain_peft(family, tmp_path):
    base = build(family)
    expert_params = sorted(t.name for t in find_targets(base) if t.group == "experts")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], target_parameters=expert_params)
    plain = get_peft_model(base, config)
    _randomise_lora(plain, seed=3)
    plain.train()
    batch = random_batch()
    loss = plain(**batch).loss
    loss.backward()  # a PEFT training step, with PEFT's own expert path
    torch.optim.SGD([p for p in plain.parameters() if p.requires_grad], lr=0.1).step()
    plain.eval()
    with torch.no_grad():
        want = plain(**batch).logits
    plain.save_pretrained(tmp_path / "plain")

    loaded = load_adapter(build(family), tmp_path / "plain")
    assert fast_path_modules(loaded)
    with torch.no_grad():
        got = loaded.eval()(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = load_adapter(build(family), tmp_path / "plain", is_trainable=True)
    assert any(p.requires_grad for n, p in trainable.named_parameters() if "experts" in n)


def test_bf16_and_gradient_checkpointing_train_the_fast_path():
    batch = random_batch()
    model = apply_lora(build("moetune"), targets=["attention", "experts"], r=4, alpha=8)
    _randomise_lora(model)
    model.train()
    _, _, grads = _loss_and_grads(model, batch)

    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    _, _, ckpt_grads = _loss_and_grads(model, batch)
    for name, grad in grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    bf16 = apply_lora(build("moetune").to(torch.bfloat16), targets=["attention", "experts"], r=4, alpha=8)
    _randomise_lora(bf16)
    bf16.train()
    loss, _, bf16_grads = _loss_and_grads(bf16, batch)
    assert torch.isfinite(loss)
    expert_grads = [g for n, g in bf16_grads.items() if ".experts." in n]
    assert expert_grads and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in expert_grads)

    # fp32 weights under bf16 autocast (mixed-precision training): experts compute in their weights'
    # dtype, like transformers' grouped_mm path, so fast and PEFT paths agree
    model.activation_checkpointing_disable()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = model(**batch).loss
        remove_fast_path(model)
        torch.testing.assert_close(model(**batch).loss, fast)


def test_count_target_groups_per_family():
    counts = {family: count_target_groups(build(family)) for family in FAMILIES}
    # 2 layers each; DeepSeek-V3: MLA (q_a, q_b, kv_a_with_mqa, kv_b, o) and 1 leading dense layer
    assert counts["deepseek_v3"] == {
        "attention": 10, "experts": 2, "shared_experts": 3, "router": 1, "dense_mlp": 3,
    }  # fmt: skip
    assert counts["moetune"] == {
        "attention": 8,
        "experts": 4,
        "shared_experts": 6,
        "router": 2,
        "dense_mlp": 0,
    }
    assert counts["qwen3_moe"]["shared_experts"] == 0 and counts["mixtral"]["experts"] == 4
    mla = {t.name.rsplit(".", 1)[-1] for t in find_targets(build("deepseek_v3")) if t.group == "attention"}
    assert mla == {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}


def test_target_report_lists_groups_and_trainable_share():
    model = apply_lora(build("deepseek_v3"), targets=["attention", "experts", "shared_experts"], r=4, alpha=8)
    report = target_report(model)
    lines = {line.split()[0]: line for line in report.splitlines()[2:]}
    assert "10 modules" in lines["attention"]
    assert "2 params" in lines["experts"]
    assert "3 modules" in lines["shared_experts"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"{trainable:,}" in lines["total"]


def test_shared_experts_and_dense_mlp_survive_peft_v4_renames(tmp_path):
    """PEFT rewrites DeepSeek-V3 `*.down_proj` module targets into fused experts; ours must not move."""
    model = apply_lora(build("deepseek_v3"), targets=["shared_experts", "dense_mlp"], r=4, alpha=8)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == {
        f"base_model.model.model.layers.{i}.mlp.{part}{proj}"
        for i, part in ((0, ""), (1, "shared_experts."))
        for proj in ("gate_proj", "up_proj", "down_proj")
    }
    assert not any(".experts." in n for n in adapted)
    _randomise_lora(model)
    _assert_plain_peft_reproduces(model, "deepseek_v3", tmp_path / "a", random_batch())
    assert "3 modules" in target_report(model).split("shared_experts")[1].splitlines()[0]


def test_requested_group_that_matches_nothing_is_a_loud_error():
    with pytest.raises(
        MoetuneError, match=r"'shared_experts' matches nothing.*attention \(8\).*experts \(4\)"
    ):
        apply_lora(build("mixtral"), targets=["attention", "shared_experts"])
    with pytest.raises(MoetuneError, match="'dense_mlp' matches nothing in layers 1"):
        apply_lora(build("deepseek_v3"), targets=["dense_mlp"], layers="1-1")
    with pytest.raises(MoetuneError, match="neither a group"):
        apply_lora(build("qwen3_moe"), targets=["attention", "no_such_proj"])


def test_layers_raw_names_and_group_overrides(tmp_path):
    base = build("moetune")
    model = apply_lora(
        base,
        targets=["experts", "q_proj"],
        layers="1-1",
        group_overrides={"experts": {"r": 2, "alpha": 4}},
        r=4,
        alpha=8,
    )
    names = {n for n, _ in model.named_parameters() if "lora_A" in n}
    assert names and all(".layers.1." in n for n in names)
    assert any("q_proj" in n for n in names) and not any("k_proj" in n for n in names)
    experts = model.base_model.model.model.layers[1].mlp.experts
    assert experts.r["default"] == 2 and experts.scaling["default"] == 2.0
    _randomise_lora(model)
    _assert_plain_peft_reproduces(model, "moetune", tmp_path / "a", random_batch())
    with pytest.raises(MoetuneError, match="start-end"):
        apply_lora(build("moetune"), targets=["experts"], layers="3-1")
    with pytest.raises(MoetuneError, match="layers 0-1"):
        apply_lora(build("moetune"), targets=["experts"], layers=[5])


def test_refusals_at_construction():
    with pytest.raises(MoetuneError, match="dropout=0.1 cannot apply to expert"):
        apply_lora(build("moetune"), targets=["attention", "experts"], dropout=0.1)
    apply_lora(build("moetune"), targets=["attention"], dropout=0.1)  # attention-only dropout is fine
    with pytest.raises(MoetuneError, match="router"):
        apply_lora(build("moetune"), targets=["experts"], router="sometimes")
    with pytest.raises(MoetuneError, match="set router: lora"):
        apply_lora(build("moetune"), targets=["experts", "router"])
    with pytest.raises(MoetuneError, match="unknown group"):
        apply_lora(build("moetune"), targets=["experts"], group_overrides={"expert": {"r": 2}})
    with pytest.raises(MoetuneError, match="fused experts"):
        apply_lora(build("moetune"), targets=["experts"], init_lora_weights="pissa")


@pytest.mark.parametrize("family", ["moetune", "deepseek_v3"])
def test_router_train_and_router_lora(family, tmp_path):
    batch = random_batch()
    trained = apply_lora(build(family), targets=["attention"], router="train", r=4)
    router_params = [n for n, p in trained.named_parameters() if p.requires_grad and "mlp.gate" in n]
    assert router_params and all("modules_to_save" in n for n in router_params)
    trained.train()
    trained(**batch).loss.backward()
    assert all(p.grad.abs().sum() > 0 for n, p in trained.named_parameters() if n in router_params)
    assert "router" in target_report(trained)
    trained.save_pretrained(tmp_path / "t")
    with safe_open(str(tmp_path / "t" / "adapter_model.safetensors"), "pt") as f:
        saved = f.keys()
    assert any("mlp.gate" in k for k in saved)

    lora = apply_lora(build(family), targets=["experts"], router="lora", r=4)
    assert any("mlp.gate" in n and "lora_A" in n for n, _ in lora.named_parameters())
    _randomise_lora(lora)
    _assert_plain_peft_reproduces(lora, family, tmp_path / "l", batch)


def test_router_train_keeps_aux_loss_on():
    model = apply_lora(build("qwen3_moe"), targets=["attention"], router="train", r=4)
    assert model.get_base_model().config.output_router_logits
    out = model.train()(**random_batch())
    assert out.aux_loss is not None


def test_expert_selection_trains_only_selected_experts_and_stays_loadable(tmp_path):
    selection = {0: [1, 5], 1: [2]}
    path = tmp_path / "selection.json"
    path.write_text(json.dumps({"metric": "token_ratio", "threshold": 0.2, "layers": selection}))
    model = apply_lora(build("moetune"), targets=["attention", "experts"], experts=str(path), r=4, alpha=8)
    assert "(3/16 experts)" in target_report(model)  # (2 + 1) chosen of 8 per layer, 2 layers
    model.train()
    model(**random_batch()).loss.backward()
    experts = model.base_model.model.model.layers[0].mlp.experts  # down_proj wrapper (outermost)
    grad_b = experts.lora_B["default"].weight.grad  # (out, r * E): expert e in columns e, e + E, ...
    nonzero = {e for e in range(8) if grad_b.view(grad_b.shape[0], 4, 8)[:, :, e].abs().sum() > 0}
    assert nonzero == {1, 5}
    assert experts.lora_A["default"].weight.view(8, 4, -1)[[0, 2, 3, 4, 6, 7]].abs().sum() == 0
    _assert_plain_peft_reproduces(model, "moetune", tmp_path / "esft", random_batch(seed=4))
    assert "(3/16 experts)" in target_report(load_adapter(build("moetune"), tmp_path / "esft"))
    with pytest.raises(MoetuneError, match="selects expert 9 but has 8"):
        apply_lora(build("moetune"), targets=["experts"], experts={0: [9]})
    with pytest.raises(MoetuneError, match="not found"):
        apply_lora(build("moetune"), targets=["experts"], experts=str(tmp_path / "missing.json"))


def test_load_adapter_refuses_wrong_base_and_non_adapter(tmp_path):
    with pytest.raises(MoetuneError, match="no adapter_config.json"):
        load_adapter(build("moetune"), tmp_path)
    model = apply_lora(build("qwen3_moe"), targets=["attention", "experts"], r=4)
    model.save_pretrained(tmp_path / "qwen")
    with pytest.raises(MoetuneError, match="does not (fit|match) DeepseekV3ForCausalLM"):
        load_adapter(build("deepseek_v3"), tmp_path / "qwen")
    with pytest.raises(MoetuneError, match="does not (fit|match) Qwen3MoeForCausalLM"):
        load_adapter(build("qwen3_moe", hidden_size=48), tmp_path / "qwen")


def test_multimodal_groups_encoders_and_projector():
    from transformers import AutoModelForCausalLM

    from finetune.modeling.multimodal import multimodal_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        multimodal_config("tiny", ["image", "audio", "text"], vocab_size=128)
    )
    counts = count_target_groups(model)
    assert counts["attention"] == 8  # the decoder's only: the Wav2Vec2 / BERT layers are encoders
    assert counts["encoders"] > 0 and counts["projector"] >= 3
    peft_model = apply_lora(model, targets=["encoders", "projector"], r=4)
    lora_names = [n for n, _ in peft_model.named_parameters() if "lora_A" in n]
    assert lora_names and all(".encoders." in n for n in lora_names)
    trained_whole = [
        n for n, p in peft_model.named_parameters() if p.requires_grad and "modules_to_save" in n
    ]
    assert any(".projectors.image." in n for n in trained_whole)
    report = target_report(peft_model)
    assert "encoders" in report and "projector" in report


def test_fast_path_under_ddp_and_fsdp2_wrapping(tmp_path):
    """One-process gloo group on the CPU: DDP and FSDP2 (fully_shard) see the same gradients."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    # A file store: no TCP port to pick, release and re-bind (another process could take it between).
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        batch = random_batch()
        model = apply_lora(build("moetune"), targets=["attention", "experts"], r=4)
        _randomise_lora(model)
        model.train()
        _, _, want = _loss_and_grads(model, batch)

        ddp = torch.nn.parallel.DistributedDataParallel(model)
        _, _, got = _loss_and_grads(ddp, batch)
        assert {n.removeprefix("module."): g for n, g in got.items()}.keys() == want.keys()
        for name, grad in got.items():
            torch.testing.assert_close(grad, want[name.removeprefix("module.")], msg=name)

        sharded = apply_lora(build("moetune"), targets=["attention", "experts"], r=4)
        sharded.load_state_dict(model.state_dict())
        sharded.train()
        for layer in sharded.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(sharded)
        assert fast_path_modules(sharded)
        _, _, got = _loss_and_grads(sharded, batch)
        for name, grad in got.items():
            torch.testing.assert_close(grad.full_tensor(), want[name], msg=name)
    finally:
        dist.destroy_process_group()


def test_rslora_scaling_on_the_fast_path():
    model = apply_lora(build("mixtral"), targets=["experts"], r=4, alpha=8, use_rslora=True)
    experts = model.base_model.model.model.layers[0].mlp.experts
    assert experts.scaling["default"] == 8 / 4**0.5
    _randomise_lora(model)
    batch = random_batch()
    with torch.no_grad():
        fast = model(**batch).logits
        remove_fast_path(model)
        torch.testing.assert_close(model(**batch).logits, fast, rtol=1e-5, atol=1e-5)
