"""verify-export: does a vLLM / SGLang export compute what base + adapter computes?

The export is read by `adapters.serving_reader` (the servers' rules, independent of the writer), its
deltas are added to a float32 copy of the base, and that model's logits are compared with PEFT's
base + the original adapter on fixed random batches. Both run in float32 on the CPU, so a difference
above float32 rounding is the export's (a wrong split of gate and up, a lost scaling, a missing
expert), not 16-bit noise.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.errors import MoetuneError
from adapters.serving_reader import export_deltas, read_export

# max |logit difference| allowed, as a share of max(1, the largest |logit|) of base + adapter: the
# float32 default of verify-merge (rounding over a real model's depth stays below it; a wrong split of
# gate and up, a lost scaling or a missing expert moves logits by the adapter's own effect)
DEFAULT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ExportCheck:
    """The outcome of one comparison (numbers for tests and scripts, `line` for people)."""

    max_abs: float  # largest |logit difference|
    scale: float  # largest |logit| of base + adapter
    tolerance: float  # relative, of max(1, scale)
    line: str

    @property
    def relative(self) -> float:
        return self.max_abs / max(1.0, self.scale)

    @property
    def passed(self) -> bool:
        return self.relative <= self.tolerance  # False for NaN


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
    served = _load(base)
    with torch.no_grad():
        for name, delta in export_deltas(export, served).items():  # checks the export fits the base
            weight = served.get_parameter(name)
            weight.add_(delta.to(weight.dtype))
    try:
        with _quiet():
            reference = PeftModel.from_pretrained(_load(base), str(adapter)).eval()
    except Exception as err:
        raise MoetuneError(
            f"PEFT cannot load adapter {adapter} on {base}: {str(err).splitlines()[0]}"
        ) from err
    vocab = served.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(0)
    worst, scale = torch.tensor(0.0), torch.tensor(0.0)
    with torch.no_grad():
        for _ in range(batches):
            ids = torch.randint(0, vocab, (batch_size, length), generator=gen)
            expected = reference(input_ids=ids).logits
            worst = torch.maximum(worst, (expected - served(input_ids=ids).logits).abs().max())  # NaN stays
            scale = torch.maximum(scale, expected.abs().max())
    worst, scale = worst.item(), scale.item()
    relative = worst / max(1.0, scale)
    verdict = "PASS" if relative <= tolerance else "FAIL"
    line = (
        f"{verdict}: {export.folder} ({export.target}, {export.layout}) vs base + {adapter}: max |logit "
        f"difference| {worst:.3g} ({relative:.3g} of max(1, largest |logit| {scale:.3g}); tolerance "
        f"{tolerance:g}) over {batches} batches of {batch_size} x {length} tokens"
    )
    return ExportCheck(worst, scale, tolerance, line)


def verify_export(
    export_dir: str | Path,
    base_folder: str | Path,
    adapter_dir: str | Path,
    *,
    tolerance: float | None = None,
) -> str:
    """The PASS line; a MoetuneError carrying the FAIL line when the export does not match."""
    check = check_export(export_dir, base_folder, adapter_dir, tolerance=tolerance)
    if not check.passed:
        raise MoetuneError(check.line)
    return check.line


def _load(folder: Path):
    from transformers import AutoModelForCausalLM

    try:
        with _quiet():
            return AutoModelForCausalLM.from_pretrained(
                folder,
                dtype=torch.float32,
                use_safetensors=True,
                trust_remote_code=False,
                local_files_only=True,
            ).eval()
    except Exception as err:
        raise MoetuneError(f"cannot load {folder} as a model: {str(err).splitlines()[0]}") from err


@contextmanager
def _quiet():
    """PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing`; that FutureWarning is theirs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield
