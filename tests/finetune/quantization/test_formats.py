"""int8 / NF4 storage of expert stacks: the definitions, and agreement with bitsandbytes."""

from __future__ import annotations

import bitsandbytes.functional as bnb_functional
import pytest
import torch

from finetune.quantization import formats
from finetune.quantization.formats import NF4_BLOCK, QuantizedShape, dequantize_expert, quantize

# (E, out, in): blocks of 64 that end inside a row (12 x 20), an expert that ends mid-block (3 x 10),
# and whole-row blocks (8 x 64)
SHAPES = [(3, 12, 20), (2, 3, 10), (4, 8, 64)]


def _shape(method, weight):
    return QuantizedShape(method, *weight.shape)


def test_nf4_code_book_is_bitsandbytes():
    state = bnb_functional.quantize_4bit(torch.randn(64), blocksize=64, quant_type="nf4")[1]
    torch.testing.assert_close(torch.tensor(formats.NF4_CODE), state.code, rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_bytes_and_scales_are_bitsandbytes_per_expert(shape):
    weight = torch.randn(shape) * torch.logspace(-2, 1, shape[1]).unsqueeze(
        -1
    )  # rows of very different scale
    codes, absmax = quantize(weight, "nf4")
    qshape = _shape("nf4", weight)
    assert codes.shape == qshape.qweight_shape() and absmax.shape == qshape.scale_shape()
    for e in range(shape[0]):
        flat = weight[e].reshape(-1)
        bnb_codes, state = bnb_functional.quantize_4bit(flat, blocksize=NF4_BLOCK, quant_type="nf4")
        n_bytes = bnb_codes.numel()
        assert torch.equal(codes[e, :n_bytes], bnb_codes.view(-1))  # same bytes, same block layout
        assert torch.equal(absmax[e], state.absmax)
        bnb_values = bnb_functional.dequantize_4bit(bnb_codes, state).view(shape[1:])
        assert torch.equal(dequantize_expert(codes, absmax, qshape, e, torch.float32), bnb_values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_dequantize_is_the_definition(shape, dtype):
    weight = torch.randn(shape)
    codes, absmax = quantize(weight, "nf4")
    qshape = _shape("nf4", weight)
    code = torch.tensor(formats.NF4_CODE)
    for e in range(shape[0]):
        # the definition written out: per flattened element, code[nibble] * absmax of its block
        flat = codes[e]
        nibbles = torch.stack((flat >> 4, flat & 15), -1).reshape(-1)[: qshape.numel].long()
        block = torch.arange(qshape.numel) // NF4_BLOCK
        want = (code[nibbles] * absmax[e][block]).view(shape[1:]).to(dtype)
        assert torch.equal(formats.dequantize_nf4_reference(flat, absmax[e], qshape, dtype), want)
        assert torch.equal(dequantize_expert(codes, absmax, qshape, e, dtype), want)  # bitsandbytes kernel
        # and every value is the nearest code point of its block
        err = (want.float() - weight[e]).abs().reshape(-1)
        gaps = (code[1:] - code[:-1]).max() / 2
        assert (err <= gaps * absmax[e][block] * 1.01 + 1e-2 * (dtype == torch.bfloat16)).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_is_symmetric_per_output_row(shape):
    weight = torch.randn(shape) * torch.logspace(-3, 1, shape[1]).unsqueeze(-1)
    codes, scale = quantize(weight, "int8")
    assert codes.dtype == torch.int8 and scale.shape == shape[:2]
    assert codes.abs().max() <= 127
    torch.testing.assert_close(scale * 127, weight.abs().amax(-1))  # one scale per expert and row
    qshape = _shape("int8", weight)
    for e in range(shape[0]):
        values = dequantize_expert(codes, scale, qshape, e, torch.float32)
        assert ((values - weight[e]).abs() <= scale[e].unsqueeze(-1) / 2 + 1e-7).all()
        # bitsandbytes' LLM.int8 row-wise rule gives the same codes
        bnb_codes, bnb_stats, _ = bnb_functional.int8_vectorwise_quant(weight[e].clone())
        assert torch.equal(codes[e], bnb_codes)


def test_blocks_never_cross_experts():
    """Changing one expert's weights changes no other expert's codes or scales."""
    weight = torch.randn(3, 3, 7)  # 21 weights per expert: blocks would straddle experts if flattened
    codes, absmax = quantize(weight, "nf4")
    weight[1] *= 100
    codes2, absmax2 = quantize(weight, "nf4")
    assert torch.equal(codes[0], codes2[0]) and torch.equal(codes[2], codes2[2])
    assert torch.equal(absmax[0], absmax2[0]) and torch.equal(absmax[2], absmax2[2])


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown quantization method 'int4'"):
        quantize(torch.randn(1, 2, 64), "int4")


def test_sizes():
    nf4 = QuantizedShape("nf4", 128, 1024, 512)
    assert nf4.nbytes() == 128 * 1024 * 512 // 2 + 4 * 128 * 1024 * 512 // 64
    assert nf4.nbytes() / (2 * 128 * 1024 * 512) == pytest.approx(formats.bytes_per_weight("nf4") / 2)
