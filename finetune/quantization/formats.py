"""Storage formats for frozen expert weights: int8 per output row, and NF4 in blocks of 64.

Both formats quantize each expert's logical weight matrix W_e (out, in) on its own, so a block or a
scale never spans two experts and expert e can be dequantized alone:

- int8: symmetric per output row, W_e[o] ~ q[o] * scale[o] with scale = absmax(W_e[o]) / 127 and
  q = round(W_e[o] * 127 / absmax) in [-127, 127] (bitsandbytes' LLM.int8 row-wise rule).
- NF4: W_e flattened row-major and cut into blocks of 64; each block stores absmax (fp32) and 4-bit
  indices into the NormalFloat4 code book (QLoRA), two per byte, high nibble first. The last block
  of an expert is zero-padded. This is bitsandbytes' `quantize_4bit(..., blocksize=64,
  quant_type="nf4")` applied to each expert, so the stored bytes are the ones bitsandbytes writes.

Kernels (why): dequantizing one expert is on the hot path (every hit expert, forward and backward).
bitsandbytes' native NF4 dequantize is about 10x faster than the same lookup in torch on a CPU and
is its CUDA kernel on GPUs, so NF4 uses it when bitsandbytes is installed and falls back to the torch
definition below otherwise (same values). int8 is one fused multiply in torch: torch's weight-only
int8 matmul (`_weight_int8pack_mm`) measured slower than dequantize + GEMM on the CPU here, and it has
no transposed form for the backward GEMM.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import lru_cache

import torch

METHODS = ("int8", "nf4")
NF4_BLOCK = 64

# The NormalFloat4 code book (Dettmers et al., QLoRA, appendix E), as bitsandbytes stores it; four
# values a row, as the paper prints it (hence the fmt: skip).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


@dataclass(frozen=True)
class QuantizedShape:
    """Sizes of one quantized fused weight: E experts of a logical (out, in) matrix each."""

    method: str
    num_experts: int
    out_features: int
    in_features: int

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    @property
    def blocks(self) -> int:  # NF4 blocks per expert
        return math.ceil(self.numel / NF4_BLOCK)

    def qweight_shape(self) -> tuple[int, ...]:
        if self.method == "int8":
            return (self.num_experts, self.out_features, self.in_features)
        return (self.num_experts, self.blocks * NF4_BLOCK // 2)

    def scale_shape(self) -> tuple[int, ...]:
        if self.method == "int8":
            return (self.num_experts, self.out_features)
        return (self.num_experts, self.blocks)

    def qweight_dtype(self) -> torch.dtype:
        return torch.int8 if self.method == "int8" else torch.uint8

    def nbytes(self) -> int:
        """Bytes of the stored codes and scales (fp32) together."""
        return math.prod(self.qweight_shape()) + 4 * math.prod(self.scale_shape())


def bytes_per_weight(method: str) -> float:
    """Average stored bytes per weight for large matrices (codes + fp32 scales)."""
    if method == "int8":
        return 1.0  # + 4 bytes per output row, negligible for wide rows
    return 0.5 + 4 / NF4_BLOCK


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
    return method


# ----------------------------------------------------------------------------- quantize


def quantize(weight: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, out, in) float weights -> (codes, scales) in the layout of `QuantizedShape`."""
    check_method(method)
    if method == "int8":
        return quantize_int8(weight)
    return quantize_nf4(weight)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = weight.float()
    absmax = w.abs().amax(dim=-1)  # (E, out)
    q = torch.round(w * (127.0 / absmax.clamp(min=1e-38)).unsqueeze(-1)).to(torch.int8)
    return q, absmax / 127.0


def quantize_nf4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per expert: blocks of 64 of the flattened (out, in) matrix, absmax scaling, nearest NF4 code."""
    num_experts = weight.shape[0]
    flat = weight.reshape(num_experts, -1).float()  # (E, n)
    pad = -flat.shape[1] % NF4_BLOCK
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))  # zeros change no block's absmax
    blocks = flat.view(num_experts, -1, NF4_BLOCK)  # (E, nblocks, 64)
    absmax = blocks.abs().amax(dim=-1)  # (E, nblocks)
    # bitsandbytes' rule: multiply by the reciprocal, clamp, bucketize on the code's midpoints
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(-1)).clamp_(-1, 1)
    index = torch.bucketize(scaled, _nf4_midpoints(scaled.device), out_int32=True).to(torch.uint8)
    index = index.view(num_experts, -1)
    packed = (index[:, 0::2] << 4) | index[:, 1::2]  # (E, n_padded / 2), high nibble first
    return packed, absmax


@lru_cache(maxsize=8)
def _nf4_code(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


@lru_cache(maxsize=8)
def _nf4_midpoints(device: torch.device) -> torch.Tensor:
    code = _nf4_code(device)
    return (code[:-1] + code[1:]) / 2


# ----------------------------------------------------------------------------- dequantize


def dequantize_expert(
    qweight: torch.Tensor, scale: torch.Tensor, shape: QuantizedShape, expert: int, dtype: torch.dtype
) -> torch.Tensor:
    """Expert `expert`'s logical (out, in) weight in `dtype`, from the stored codes and scales."""
    if shape.method == "int8":
        # one fused kernel: int8 * fp32 scale, rounded once to dtype
        return torch.mul(qweight[expert], scale[expert].unsqueeze(-1)).to(dtype)
    return dequantize_nf4(qweight[expert], scale[expert], shape, dtype)


def dequantize_experts(
    qweight: torch.Tensor,
    scale: torch.Tensor,
    shape: QuantizedShape,
    first: int,
    end: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Experts first:end as (n, out, in) in `dtype`: one kernel call for the whole range."""
    n = end - first
    if shape.method == "int8":
        return torch.mul(qweight[first:end], scale[first:end].unsqueeze(-1)).to(dtype)
    # the experts' codes and block scales are contiguous: dequantize them as one long expert
    joined = QuantizedShape("nf4", 1, n, shape.blocks * NF4_BLOCK)
    flat = dequantize_nf4(
        qweight[first:end].reshape(-1), scale[first:end].reshape(-1), joined, dtype
    )  # (n, padded)
    return flat[:, : shape.numel].reshape(n, shape.out_features, shape.in_features)


def dequantize_nf4(
    packed: torch.Tensor, absmax: torch.Tensor, shape: QuantizedShape, dtype: torch.dtype
) -> torch.Tensor:
    """One expert's NF4 codes (n_padded / 2,) and block absmax (nblocks,) -> (out, in) in `dtype`."""
    if _bitsandbytes_dequantize() is not None and dtype in (torch.float32, torch.bfloat16, torch.float16):
        return _bitsandbytes_dequantize()(packed, absmax, shape, dtype)
    return dequantize_nf4_reference(packed, absmax, shape, dtype)


def dequantize_nf4_reference(
    packed: torch.Tensor, absmax: torch.Tensor, shape: QuantizedShape, dtype: torch.dtype
) -> torch.Tensor:
    """The definition in torch: code[index] * absmax of its block, in fp32, rounded once to dtype."""
    index = torch.stack((packed >> 4, packed & 0x0F), dim=-1).view(-1, NF4_BLOCK).long()  # (nblocks, 64)
    values = _nf4_code(packed.device)[index] * absmax.float().unsqueeze(-1)
    return values.view(-1)[: shape.numel].view(shape.out_features, shape.in_features).to(dtype)


@lru_cache(maxsize=1)
def _bitsandbytes_dequantize():
    """bitsandbytes' dequantize_4bit as (packed, absmax, shape, dtype) -> tensor, or None if absent."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # see adapters/__init__
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError:
        return None

    def run(packed, absmax, shape, dtype):
        state = bnb_functional.QuantState(
            absmax=absmax,
            shape=torch.Size([shape.blocks * NF4_BLOCK]),
            code=_nf4_code(packed.device),
            blocksize=NF4_BLOCK,
            quant_type="nf4",
            dtype=dtype,
        )
        flat = bnb_functional.dequantize_4bit(packed, state)  # (n_padded,)
        return flat.reshape(-1)[: shape.numel].view(shape.out_features, shape.in_features)

    return run
