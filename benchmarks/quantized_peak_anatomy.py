"""What the peak of a quantized LoRA step is made of: tensors against what malloc holds.

The peak ratios of benchmarks/quantized_experts.py (memory part) compare whole-process resident
memory. This script splits one process's memory, after each forward / backward / AdamW step, into
glibc's own counters (`mallinfo2`: heap in use, heap free but kept, large blocks mapped on their own)
and, at the end, the tensors Python can see (model weights and LoRA factors, AdamW states). It runs
on the model that benchmark writes (`runs/bench-quantized/qwen-bf16`; run its memory part first).

    python benchmarks/quantized_peak_anatomy.py nf4            # or int8, or float (bf16)
    MOETUNE_CPU_MEMORY=keep python benchmarks/quantized_peak_anatomy.py nf4   # finetune.cpu_memory off

Prints a table; writes nothing. Linux with glibc only.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.proc_memory import status  # noqa: E402

MODEL = ROOT / "runs" / "bench-quantized" / "qwen-bf16"
MIB = 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in [
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        ]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("kind", choices=["float", "int8", "nf4"])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    if not MODEL.is_dir():
        raise SystemExit(
            f"{MODEL} does not exist: run `python benchmarks/quantized_experts.py --part memory` first"
        )

    importlib.import_module("finetune")  # first, as the CLI does: its CPU memory settings precede torch
    import torch

    import adapters
    from finetune.loading import load_model

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    torch.set_num_threads(2)
    base = status("VmRSS")
    print(
        f"{'when':<8} {'RSS':>6} {'peak':>6} {'heap used':>10} {'heap free':>10} {'mapped':>7}  (MiB above the baseline; heap and mapped absolute)"
    )

    def row(when: str) -> None:
        info = libc.mallinfo2()
        print(
            f"{when:<8} {(status('VmRSS') - base) / MIB:6.0f} {(status('VmHWM') - base) / MIB:6.0f} "
            f"{info.uordblks / MIB:10.0f} {info.fordblks / MIB:10.0f} {info.hblkhd / MIB:7.0f}",
            flush=True,
        )

    quantize = None if args.kind == "float" else args.kind
    model, _ = load_model(str(MODEL), dtype="bfloat16", quantize=quantize)
    row("loaded")
    model = adapters.apply_lora(model, targets=["attention", "experts"], r=16, alpha=32)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(3, 4096, (1, 256), generator=torch.Generator().manual_seed(0))
    for step in range(args.steps):
        loss = model(input_ids=ids, labels=ids).loss
        row(f"fwd {step}")
        loss.backward()
        row(f"bwd {step}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        row(f"adam {step}")

    def storage_bytes(tensors) -> int:
        seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(seen.values())

    weights = storage_bytes([*model.parameters(), *model.buffers()])
    states = storage_bytes([t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)])
    print(f"tensors: model + LoRA {weights / MIB:.0f} MiB, AdamW states {states / MIB:.0f} MiB")


if __name__ == "__main__":
    main()
