"""verify-export: does a vLLM / SGLang export compute what base + adapter computes?

The export is read by `adapters.serving_reader` (the servers' rules, independent of the writer), its
deltas are added to a float32 copy of the base, and that model's logits are compared with PEFT's
base + the original adapter on fixed random batches. Both run in float32 on the CPU, so a difference
above float32 rounding is the export's (a wrong split of gate and up, a lost scaling, a missing
expert), not 16-bit noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.errors import MoetuneError
from adapters.merge_verify import load_float32, max_logit_difference
from adapters.quiet import quiet_transformers
from adapters.serving_reader import export_deltas, read_export

# max |logit difference| allowed, as a share of max(1, the largest |logit|) of base + adapter: the
# float32 default of verify-merge (rounding over a real model's depth stays below it; a wrong split of
# gate and up, a lost scaling or a missing expert moves logits by the adapter's own effect)
DEFAULT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ExportCheck:
    """The outcome of one comparison; `str()` is the PASS / FAIL line verify-export prints."""

    export: Path
    target: str  # vllm | sglang
    layout: str  # per-expert | fused
    adapter: Path
    max_abs: float  # largest |logit difference|
    scale: float  # largest |logit| of base + adapter
    tolerance: float  # relative, of max(1, scale)
    batches: int
    batch_size: int
    length: int

    @property
    def relative(self) -> float:
        return self.max_abs / max(1.0, self.scale)

    @property
    def passed(self) -> bool:
        return self.relative <= self.tolerance  # False for NaN

    def __str__(self) -> str:
        return (
            f"{'PASS' if self.passed else 'FAIL'}: {self.export} ({self.target}, {self.layout}) vs base + "
            f"{self.adapter}: max |logit difference| {self.max_abs:.3g} ({self.relative:.3g} of max(1, largest "
            f"|logit| {self.scale:.3g}); tolerance {self.tolerance:g}) over {self.batches} batches of "
            f"{self.batch_size} x {self.length} tokens"
        )


def check_export(
    export_dir: str | Path,
    base_folder: str | Path,
    adapter_dir: str | Path,
    *,
    tolerance: float | None = None,
    batches: int = 3,
    batch_size: int = 2,
    length: int = 32,
) -> ExportCheck:
    """Logits of base + the export's deltas vs PEFT's base + adapter, on `batches` seeded batches."""
    from peft import PeftModel

    export = read_export(export_dir)
    base, adapter = Path(base_folder), Path(adapter_dir)
    tolerance = DEFAULT_TOLERANCE if tolerance is None else tolerance
    served = load_float32(base)
    with torch.no_grad():
        for name, delta in export_deltas(export, served).items():  # checks the export fits the base
            weight = served.get_parameter(name)
            weight.add_(delta.to(weight.dtype))
    try:
        with quiet_transformers():
            reference = PeftModel.from_pretrained(load_float32(base), str(adapter)).eval()
    except Exception as err:
        raise MoetuneError(
            f"PEFT cannot load adapter {adapter} on {base}: {str(err).splitlines()[0]}"
        ) from err
    worst, scale = max_logit_difference(reference, served, batches, batch_size, length)
    return ExportCheck(
        export.folder,
        export.target,
        export.layout,
        adapter,
        worst,
        scale,
        tolerance,
        batches,
        batch_size,
        length,
    )


def verify_export(
    export_dir: str | Path,
    base_folder: str | Path,
    adapter_dir: str | Path,
    *,
    tolerance: float | None = None,
) -> ExportCheck:
    """The passing check; a MoetuneError carrying the FAIL line when the export does not match."""
    check = check_export(export_dir, base_folder, adapter_dir, tolerance=tolerance)
    if not check.passed:
        raise MoetuneError(str(check))
    return check
