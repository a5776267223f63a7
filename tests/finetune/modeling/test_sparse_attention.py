"""Hierarchical sparse attention: exactness against a token-by-token reference, documents, cache, cost."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicCache

from finetune.modeling import preset_config
from finetune.modeling.sparse_attention import HierarchicalSparseAttention
from tests.helpers.sparse import (
    LAYOUTS,
    assert_gradients_match_the_definition,
    attention,
    reference,
    run,
    sparse_config,
)


@pytest.mark.parametrize(
    "shape", [dict(), dict(local_window=1, global_ratio=1.0), dict(local_window=3, global_ratio=0.3)]
)
@pytest.mark.parametrize("kv_heads", [2, 4])
@pytest.mark.parametrize("length", [1, 2, 5, 37])
def test_matches_the_token_by_token_definition(kv_heads, length, shape):
    config = sparse_config(num_key_value_heads=kv_heads, **shape)
    module = attention(config)
    hidden = torch.randn(1, length, config.hidden_size)
    out = run(module, config, hidden, torch.arange(length)[None])
    torch.testing.assert_close(out, reference(module, config, hidden, 0, length), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [dict(), dict(local_window=1, global_ratio=1.0)])
@pytest.mark.parametrize("kv_heads", [2, 4])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gradients_match_the_definition(kv_heads, layout, shape):
    config = sparse_config(num_key_value_heads=kv_heads, **shape)
    assert_gradients_match_the_definition(config, layout)


@pytest.mark.parametrize("chunk", [1, 12])
@pytest.mark.parametrize("layout", ["left padded", "packed", "packed and padded"])
def test_general_path_in_small_chunks_matches_the_definition(monkeypatch, layout, chunk):
    """The general path's global branch reads the summaries a chunk of rows at a time: tiny chunks, same result.

    chunk 1: one query row per chunk (rows before their document's first block read nothing);
    chunk 12: several rows and several summaries per chunk.
    """
    from finetune.modeling import sparse_attention

    monkeypatch.setattr(sparse_attention, "_GLOBAL_CHUNK", chunk)
    assert_gradients_match_the_definition(sparse_config(num_key_value_heads=2), layout)


def test_packed_documents_and_left_padding_match_each_document_alone():
    config = sparse_config()
    module = attention(config)
    a, b = torch.randn(1, 13, config.hidden_size), torch.randn(1, 21, config.hidden_size)
    pad = torch.randn(1, 3, config.hidden_size)
    # row: 3 pads | doc a (13) | doc b (21), positions restarting at 0 for each document
    hidden = torch.cat([pad, a, b], dim=1)
    position_ids = torch.cat([torch.zeros(3), torch.arange(13), torch.arange(21)]).long()[None]
    padding_mask = torch.cat([torch.zeros(3), torch.ones(34)]).long()[None]
    out = run(module, config, hidden, position_ids, padding_mask)
    torch.testing.assert_close(out[:, 3:16], reference(module, config, a, 0, 13), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[:, 16:], reference(module, config, b, 0, 21), rtol=1e-4, atol=1e-5)


def test_right_padding_changes_nothing_for_real_tokens():
    config = sparse_config()
    module = attention(config)
    hidden = torch.randn(2, 30, config.hidden_size)
    padding_mask = torch.ones(2, 30, dtype=torch.long)
    padding_mask[1, 19:] = 0
    out = run(module, config, hidden, torch.arange(30)[None], padding_mask)
    alone = run(module, config, hidden[1:, :19], torch.arange(19)[None])
    torch.testing.assert_close(out[1:, :19], alone, rtol=1e-4, atol=1e-5)


def test_global_path_carries_information_beyond_the_window():
    config = sparse_config()
    module = attention(config)
    hidden = torch.randn(1, 40, config.hidden_size)
    changed = hidden.clone()
    changed[:, 2] += 1.0  # far outside the last token's 4-token window
    for gate_bias, moves in ((-1e4, True), (1e4, False)):  # all-global gate, then all-local
        with torch.no_grad():
            module.mix_gate.weight.zero_()
            module.mix_gate.bias.copy_(torch.tensor([gate_bias, -gate_bias]))
        before = run(module, config, hidden, torch.arange(40)[None])[:, -1]
        after = run(module, config, changed, torch.arange(40)[None])[:, -1]
        assert (before - after).abs().max() > 1e-4 if moves else torch.equal(before, after)


def test_no_token_sees_a_later_token():
    config = sparse_config()
    module = attention(config)
    hidden = torch.randn(1, 30, config.hidden_size)
    base = run(module, config, hidden, torch.arange(30)[None])
    for t in (4, 9, 14, 22):  # block ends (block 5) and inside blocks
        changed = hidden.clone()
        changed[:, t] += 1.0
        out = run(module, config, changed, torch.arange(30)[None])
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
        assert (out[:, t] - base[:, t]).abs().max() > 0


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def largest_tensor(layout: str, n: int) -> int:
    """Elements of the largest tensor of one forward + backward (a cached row: forward only) at length n."""
    config = sparse_config(global_ratio=0.1, local_window=8)
    module = HierarchicalSparseAttention(config, layer_idx=0)
    hidden = torch.randn(1, n, config.hidden_size, requires_grad=True)
    positions, mask = torch.arange(n)[None], None
    if layout == "packed":  # two documents of n / 2 tokens
        positions = positions % (n // 2)
    elif layout == "left padded":
        mask = (positions >= 8).long()
        positions = (positions - 8).clamp(min=0)
    if layout == "cached":  # the second half of a prefill, reading the first half from the cache
        cache = DynamicCache(config=config)
        with torch.no_grad():
            run(module, config, hidden[:, : n // 2], positions[:, : n // 2], cache=cache)
            with LargestTensor() as probe:
                run(module, config, hidden[:, n // 2 :], positions[:, n // 2 :], cache=cache)
        return probe.largest
    with LargestTensor() as probe:
        run(module, config, hidden, positions, mask).sum().backward()
    return probe.largest


@pytest.mark.parametrize("layout", ["one document", "packed", "left padded", "cached"])
def test_memory_grows_linearly_with_length(layout):
    """From n to 2n tokens the largest tensor (forward and backward) doubles, no more.

    At these sizes a (T x summaries) score or mask tensor of the 4 heads (0.4 T^2 elements) is the
    largest one and would grow 4x; the linear ones (hidden states, q / k / v: 64 T) grow 2x.
    """
    small, large = (largest_tensor(layout, n) for n in (1024, 2048))
    assert large <= 2.1 * small, (small, large)


def test_incremental_decoding_gives_the_full_forward_tokens():
    config = sparse_config(num_hidden_layers=2, local_window=8, global_ratio=0.1, vocab_size=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    prompt = torch.randint(3, 64, (1, 11))
    out = model.generate(
        prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False, output_logits=True,
        return_dict_in_generate=True, pad_token_id=0,
    )  # fmt: skip
    tokens = out.sequences
    assert tokens.shape[1] == 11 + 64
    with torch.no_grad():
        full = model(tokens, use_cache=False).logits[:, 10:-1]  # (1, 64, V) predicting the new tokens
    torch.testing.assert_close(torch.stack(out.logits, dim=1), full, rtol=1e-4, atol=1e-4)
    assert torch.equal(full.argmax(-1), tokens[:, 11:])


@pytest.mark.parametrize("chunk", [0, 1])
def test_cache_prefill_in_pieces_matches_one_pass(monkeypatch, chunk):
    from finetune.modeling import sparse_attention

    monkeypatch.setattr(sparse_attention, "_GLOBAL_CHUNK", chunk)  # 1: one query row per chunk
    config = sparse_config()
    module = attention(config)
    hidden = torch.randn(2, 33, config.hidden_size)
    whole = run(module, config, hidden, torch.arange(33)[None])
    cache = DynamicCache(config=config)
    pieces = [
        run(module, config, hidden[:, a:b], torch.arange(a, b)[None], cache=cache)
        for a, b in ((0, 12), (12, 13), (13, 29), (29, 33))
    ]
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-4, atol=1e-5)


def test_per_layer_choice_and_bad_shape_values():
    config = preset_config("tiny", attention_type=["dense", "hierarchical_sparse"])
    model = AutoModelForCausalLM.from_config(config)
    assert type(model.model.layers[1].self_attn) is HierarchicalSparseAttention
    assert type(model.model.layers[0].self_attn) is not HierarchicalSparseAttention
    ids = torch.randint(3, 100, (2, 25))
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.model.layers[1].self_attn.mix_gate.weight.grad.abs().sum() > 0
    for bad in (dict(global_ratio=0.0), dict(global_ratio=1.5), dict(local_window=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            HierarchicalSparseAttention(sparse_config(**bad), layer_idx=0)


def test_model_left_padding_changes_nothing_for_real_tokens():
    model = AutoModelForCausalLM.from_config(sparse_config()).eval()
    ids = torch.randint(3, 100, (1, 26))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 26, dtype=torch.long)], dim=1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    alone = model(input_ids=ids).logits
    left_padded = model(input_ids=padded, attention_mask=mask, position_ids=position_ids).logits[:, 3:]
    torch.testing.assert_close(alone, left_padded, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("packed", [False, True])
def test_bfloat16_tracks_the_fp32_definition(packed):
    """bf16 on the fast path (one document) and the general path (two packed documents): output and
    input gradient within bf16 rounding of the fp32 reference."""
    config = sparse_config()
    module = attention(config)
    hidden = torch.randn(1, 50, config.hidden_size)
    position_ids = torch.arange(50)[None] % 25 if packed else torch.arange(50)[None]
    spans = [(0, 25), (25, 50)] if packed else [(0, 50)]
    probe = torch.randn(1, 50, config.hidden_size)
    x32 = hidden.clone().requires_grad_()
    want = torch.cat([reference(module, config, x32, a, b) for a, b in spans], dim=1)
    (want * probe).sum().backward()
    x16 = hidden.bfloat16().requires_grad_()
    got = run(copy.deepcopy(module).bfloat16(), config, x16, position_ids)
    (got.float() * probe).sum().backward()
    torch.testing.assert_close(got.float(), want, rtol=0.02, atol=0.01)
    torch.testing.assert_close(x16.grad.float(), x32.grad, rtol=0.02, atol=0.02)


# PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing` in PeftModel.__init__.
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_lora_reaches_the_projections_and_the_gate():
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_config(sparse_config())
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "mix_gate"]
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    ids = torch.randint(3, 100, (2, 30))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    attn = peft_model.base_model.model.model.layers[0].self_attn
    for name in targets:
        lora_b = getattr(attn, name).lora_B["default"].weight
        assert lora_b.grad is not None and lora_b.grad.abs().sum() > 0, name


def test_general_path_equals_the_fused_fast_path():
    """Other devices (and padded / packed / cached input) take the general path: same numbers, same grads."""
    from finetune.modeling.sparse_attention_kernels import Layout

    config = sparse_config()
    module = attention(config)
    q, k, v = (torch.randn(2, 29, n, 16).transpose(1, 2).requires_grad_() for n in (4, 2, 2))
    gate_logits = torch.randn(2, 29, 2, requires_grad=True)
    results = []
    for regular in (True, False):
        layout = Layout.build(None, None, 2, 0, 29, q.device)
        assert layout.regular
        layout.regular = regular
        out = module.attend(q, k, v, gate_logits, layout)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v, gate_logits))
        results.append((out, *grads))
    for fast, general in zip(*results):
        torch.testing.assert_close(fast, general, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["one document", "left padded", "packed"])
def test_local_backward_in_row_chunks_matches_the_definition(monkeypatch, layout):
    """The local backward recomputes its probabilities a chunk of rows at a time: tiny chunks, same grads."""
    from finetune.modeling import sparse_attention_kernels

    monkeypatch.setattr(sparse_attention_kernels, "LOCAL_CHUNK", 1)  # chunks of `local_window` rows
    monkeypatch.setattr(sparse_attention_kernels, "LOCAL_SHARE", 1 << 30)
    assert_gradients_match_the_definition(sparse_config(num_key_value_heads=2, local_window=3), layout)


def test_local_window_chunks_with_cached_keys_match_one_chunk(monkeypatch):
    """Keys reaching back before the queries (a cache): chunked and whole-sequence backward agree."""
    from finetune.modeling import sparse_attention_kernels

    base, length, window = 3, 17, 4
    q = torch.randn(2, 2, 2, length, 8, requires_grad=True)
    k, v = (torch.randn(2, 2, 1, base + length, 8, requires_grad=True) for _ in range(2))
    steps = torch.arange(base, base + length)[:, None] - torch.arange(window)
    allowed = (steps >= 0).expand(2, 1, 1, length, window)
    results = []
    monkeypatch.setattr(sparse_attention_kernels, "LOCAL_SHARE", 1 << 30)
    for chunk in (1 << 30, 1):
        monkeypatch.setattr(sparse_attention_kernels, "LOCAL_CHUNK", chunk)
        out = sparse_attention_kernels.LocalWindow.apply(q, k, v, allowed, base, 0.3)
        results.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    for whole, chunked in zip(*results):
        torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in results[1])


def test_fast_path_backward_twice_with_retained_graph():
    """The fused backward drops each head's kept global output once used; a second backward of the
    same graph (retain_graph) reruns those heads' forward kernels and gets the same gradients."""
    config = sparse_config(global_ratio=0.1, local_window=4)
    module = attention(config)
    hidden = torch.randn(1, 45, config.hidden_size, requires_grad=True)
    out = run(module, config, hidden, torch.arange(45)[None])
    loss = (out * torch.randn_like(out)).sum()
    first = torch.autograd.grad(loss, [hidden, *module.parameters()], retain_graph=True)
    second = torch.autograd.grad(loss, [hidden, *module.parameters()])
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert first[0].abs().sum() > 0


def test_an_all_sparse_model_builds_no_dense_causal_mask(monkeypatch):
    """The T x T mask is for dense layers only: a model whose layers are all sparse never builds it
    (400 MiB for packed input at 20480 tokens), and a model with a dense layer still does."""
    import finetune.modeling.modeling_moetune as modeling
    from tests.helpers.models import build

    calls = []
    original = modeling.create_causal_mask
    monkeypatch.setattr(modeling, "create_causal_mask", lambda **kw: calls.append(1) or original(**kw))
    ids = torch.randint(3, 100, (1, 24))
    packed = torch.cat([torch.arange(10), torch.arange(14)]).unsqueeze(0)  # two documents in one row
    with torch.no_grad():
        build("moetune", attention_type="hierarchical_sparse")(input_ids=ids, position_ids=packed)
        assert calls == []
        build("moetune", attention_type=["hierarchical_sparse", "dense"])(input_ids=ids, position_ids=packed)
    assert calls == [1]
