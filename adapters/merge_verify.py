"""verify-merge: does a merged model compute what base + adapter computes?

Both are loaded whole on the CPU and run in float32 (16-bit weights are upcast exactly), so the
difference is the merge's own error, not 16-bit arithmetic noise: nothing for float32 weights but
summation order, for 16-bit weights the rounding of the merged weights. `max_logit_difference` is
shared with verify-export (`adapters.serving_verify`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.errors import MoetuneError
from adapters.merge_plan import MERGE_HANDLES, refuse_quantized_base
from adapters.peft_format import read_adapter_config
from adapters.provenance import check_base
from adapters.quiet import one_line, quiet_transformers
from adapters.safetensors_io import float_dtype

# Default verify tolerance on the max |logit difference|, as a share of the largest |logit| (at least 1),
# by the dtype of the merged weights. verify runs in float32, so what shows is the merge's own error:
# nothing for float32 weights but summation order, for 16-bit weights the rounding of the merged weights
# (measured ~0.3% of the largest logit for bfloat16 on the test models).
DEFAULT_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@dataclass
class VerifyReport:
    """The outcome of verify-merge; `str()` is the line `moetune verify-merge` prints."""

    max_difference: float  # max |logit difference| (NaN when either model produced NaN)
    scale: float  # largest |logit| of base + adapter
    tolerance: float  # absolute
    tolerance_source: str  # "given", or how the default was derived
    weights: str  # dtype of the merged weights
    batches: int
    batch_size: int
    length: int

    @property
    def passed(self) -> bool:
        return self.max_difference <= self.tolerance  # False for NaN

    def describe(self) -> str:
        return (
            f"max |logit difference| {self.max_difference:.3g} (logits up to {self.scale:.3g}) over "
            f"{self.batches} batches of {self.batch_size}x{self.length} tokens in float32, {self.weights} "
            f"weights; tolerance {self.tolerance:.3g} ({self.tolerance_source})"
        )

    def __str__(self) -> str:
        return f"verify-merge {'passed' if self.passed else 'failed'}: {self.describe()}"


def verify_merge(
    base_folder: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    merged_folder: str | os.PathLike,
    *,
    tolerance: float | None = None,
    batches: int = 3,
    batch_size: int = 2,
    length: int = 32,
    check: bool = True,
) -> VerifyReport:
    """Compare logits of base + adapter (PEFT, unmerged) and the merged model on fixed random batches.

    Raises MoetuneError when the max |logit difference| exceeds `tolerance` (absolute; default: a share
    of the largest |logit|, at least 1, by the merged weights' dtype: float32 1e-4, float16 5e-3,
    bfloat16 2e-2); returns the passing report otherwise. check: compare the adapter's recorded base
    with `base_folder` first (`adapters.provenance.check_base`; `merge --verify` has done it already).
    """
    from peft import PeftModel

    base, adapter, merged_path = Path(base_folder), Path(adapter_dir), Path(merged_folder)
    refuse_quantized_base(base)
    weights = float_dtype(merged_path)
    adapter_config = read_adapter_config(adapter, allow=MERGE_HANDLES)  # clear errors for a bad folder
    base_model = load_float32(base)
    if check:
        check_base(adapter, adapter_config, base_model, str(base))
    try:
        with quiet_transformers():
            reference = PeftModel.from_pretrained(base_model, str(adapter)).eval()
    except Exception as err:
        raise MoetuneError(f"PEFT cannot load adapter {adapter} on {base}: {one_line(err)}") from err
    merged = load_float32(merged_path)
    worst, scale = max_logit_difference(reference, merged, batches, batch_size, length)
    name = str(weights).removeprefix("torch.")
    if tolerance is None:
        share = DEFAULT_TOLERANCE.get(weights, 1e-4)
        tol, how = (
            share * max(1.0, scale),
            f"{share:g} x max(1, largest |logit|), the default for {name} weights",
        )
    else:
        tol, how = float(tolerance), "given"
    report = VerifyReport(worst, scale, tol, how, name, batches, batch_size, length)
    if not report.passed:
        raise MoetuneError(
            f"verify-merge failed: {report.describe()}; the merged model does not equal base + adapter"
        )
    return report


def load_float32(folder: Path):
    """A model folder loaded whole on the CPU in float32 (safetensors only, no remote code, offline)."""
    from transformers import AutoModelForCausalLM

    try:
        with quiet_transformers():
            return AutoModelForCausalLM.from_pretrained(
                folder,
                dtype=torch.float32,
                use_safetensors=True,
                trust_remote_code=False,
                local_files_only=True,
            ).eval()
    except Exception as err:
        raise MoetuneError(f"cannot load {folder} as a model: {one_line(err)}") from err


def max_logit_difference(
    reference: torch.nn.Module, candidate: torch.nn.Module, batches: int, batch_size: int, length: int
) -> tuple[float, float]:
    """(max |logit difference|, largest |logit| of `reference`) over seeded random token batches.

    A NaN anywhere stays NaN (torch.maximum propagates it), so it can never pass a tolerance."""
    vocab = candidate.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(0)
    worst, scale = torch.tensor(0.0), torch.tensor(0.0)
    with torch.no_grad():
        for _ in range(batches):
            ids = torch.randint(0, vocab, (batch_size, length), generator=gen)
            expected = reference(input_ids=ids).logits
            worst = torch.maximum(worst, (expected - candidate(input_ids=ids).logits).abs().max())
            scale = torch.maximum(scale, expected.abs().max())
    return worst.item(), scale.item()
