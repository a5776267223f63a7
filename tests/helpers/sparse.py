"""Hierarchical sparse attention references for the tests: the token-by-token definition and batch layouts."""

from __future__ import annotations

import torch
from transformers.models.qwen3_moe.modeling_qwen3_moe import apply_rotary_pos_emb

from finetune.modeling import preset_config
from finetune.modeling.modeling_moetune import MoetuneRotaryEmbedding
from finetune.modeling.sparse_attention import HierarchicalSparseAttention


def sparse_config(**overrides):
    kwargs = dict(attention_type="hierarchical_sparse", local_window=4, global_ratio=0.2)
    return preset_config("tiny", **{**kwargs, **overrides})


def attention(config) -> HierarchicalSparseAttention:
    module = HierarchicalSparseAttention(config, layer_idx=0)
    with torch.no_grad():  # a gate that really mixes: both branches weigh in
        module.mix_gate.weight.normal_(std=0.3)
    return module.eval()


def run(module, config, hidden, position_ids, padding_mask=None, cache=None):
    rope = MoetuneRotaryEmbedding(config).to(hidden.device)
    return module(
        hidden, rope(hidden, position_ids), None, cache=cache, position_ids=position_ids,
        padding_mask=padding_mask,
    )[0]  # fmt: skip


def reference(module, config, hidden, start, stop):
    """The definition, one token at a time, for the document hidden[:, start:stop] (batch 1)."""
    doc = hidden[:, start:stop]
    n, d, w, block = doc.shape[1], module.head_dim, module.local_window, module.block_size
    rope = MoetuneRotaryEmbedding(config).to(doc.device)
    cos, sin = rope(doc, torch.arange(n, device=doc.device)[None])
    q = module.q_proj(doc).view(1, n, -1, d).transpose(1, 2)[0]  # (nH, n, D)
    k = module.k_proj(doc).view(1, n, -1, d).transpose(1, 2)
    v = module.v_proj(doc).view(1, n, -1, d).transpose(1, 2)[0]
    q, k = apply_rotary_pos_emb(q[None], k, cos, sin)
    q, k = q[0], k[0]
    groups = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
    gate = module.mix_gate(doc)[0].softmax(-1)
    outs = []
    for t in range(n):
        lo = max(0, t - w + 1)
        local = torch.softmax(q[:, t : t + 1] @ k[:, lo : t + 1].mT * module.scaling, -1) @ v[:, lo : t + 1]
        blocks = (t + 1) // block
        if blocks == 0:
            outs.append(local)
            continue
        sk = k[:, : blocks * block].unflatten(1, (blocks, block)).mean(2)
        sv = v[:, : blocks * block].unflatten(1, (blocks, block)).mean(2)
        glob = torch.softmax(q[:, t : t + 1] @ sk.mT * module.scaling, -1) @ sv
        outs.append(gate[t, 0] * local + gate[t, 1] * glob)
    out = torch.cat(outs, dim=1).transpose(0, 1).reshape(1, n, -1)  # (1, n, nH*D)
    return module.o_proj(out)


# name -> (pads before, document lengths, pads after) of one batch row; documents restart their
# position_ids at 0 (as the packing collator writes them), pads carry padding_mask 0
LAYOUTS = {
    "one document": (0, [23], 0),  # the fused CPU fast path
    "left padded": (2, [23], 0),  # the general path from here on
    "packed": (0, [9, 14], 0),
    "packed and padded": (3, [13, 21], 2),
}


def layout_row(config, layout: str, device="cpu", dtype=torch.float32):
    """hidden (1, T, H) leaf, position_ids (1, T), padding_mask (1, T) or None, document spans [(start, stop)]."""
    left, docs, right = LAYOUTS[layout]
    spans, positions, at = [], [torch.zeros(left, dtype=torch.long)], left
    for n in docs:
        spans.append((at, at + n))
        positions.append(torch.arange(n))
        at += n
    positions.append(torch.arange(right))
    mask = None
    if left or right:
        mask = torch.zeros(1, at + right, dtype=torch.long, device=device)
        mask[:, left:at] = 1
    hidden = torch.randn(1, at + right, config.hidden_size, dtype=dtype, device=device, requires_grad=True)
    return hidden, torch.cat(positions)[None].to(device), mask, spans


def assert_matches_the_definition(module, config, layout: str, rtol=1e-4, atol=1e-5) -> None:
    """Outputs and gradients (every parameter, the input) equal the token-by-token reference, per document.

    The input gradient also shows that no real token reads a pad: the pads' gradient is exactly zero.
    """
    device = next(module.parameters()).device
    hidden, position_ids, mask, spans = layout_row(config, layout, device)
    out = run(module, config, hidden, position_ids, mask)
    got = torch.cat([out[:, a:b] for a, b in spans], dim=1)
    want = torch.cat([reference(module, config, hidden, a, b) for a, b in spans], dim=1)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    leaves = [hidden, *module.parameters()]
    probe = torch.randn_like(got)
    got_grads = torch.autograd.grad((got * probe).sum(), leaves)
    want_grads = torch.autograd.grad((want * probe).sum(), leaves)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)
    real = torch.zeros(hidden.shape[1], dtype=torch.bool)
    for a, b in spans:
        real[a:b] = True
    assert got_grads[0][0, ~real.to(device)].abs().sum() == 0  # pads are never read
    assert all(g.abs().sum() > 0 for g in got_grads)


def assert_gradients_match_the_definition(config, layout: str) -> None:
    """Parameter and input gradients of the module (fast or general path) equal the reference's."""
    assert_matches_the_definition(attention(config), config, layout)
