"""Process settings that keep a CPU LoRA step's peak memory near its tensors.

A routed-experts step runs one GEMM per hit expert, and every expert receives a different number of
tokens, so almost every GEMM has a shape the step has not seen before. On a CPU three things then
keep memory that no tensor holds (measured with benchmarks/quantized_peak_anatomy.py on the
quantized-experts benchmark model, NF4 experts, 3 LoRA steps of 1 x 256 tokens):

- ideep's LRU cache of matmul primitives (`LRU_CACHE_CAPACITY`, 1024 by default) and oneDNN's own
  primitive cache (`ONEDNN_PRIMITIVE_CACHE_CAPACITY`, 1024) fill with one entry per shape: about
  0.25 GiB that a new step rarely reuses (its experts get other token counts);
- glibc raises its mmap threshold each time a large block is freed, so the per-expert buffers of the
  next step come from the heap, which fragments and is not given back (0.2-0.35 GiB "free" but
  resident at the peak).

`apply()` caps both caches at 64 entries (the non-expert GEMMs of a step fit) and fixes glibc's mmap
threshold at 128 KiB, its initial value: together the step peak above the loaded model fell from
~1.2 GiB to ~0.37 GiB there; the speed cost is measured in benchmarks/quantized_experts.py. Each is
a default: a value set in the environment wins, and `MOETUNE_CPU_MEMORY=keep` leaves all three
alone. ideep reads its variable when torch loads, so `import finetune` must come before `import
torch` for that part (the `moetune` command and `python -m finetune.train` do this); the other two
take effect at any time before the first matmul / allocation they govern.

Standard library only: this runs before torch is imported.
"""

from __future__ import annotations

import ctypes
import os
import sys

CACHE_CAPACITY = "64"
MMAP_THRESHOLD = 128 * 1024  # bytes; glibc's initial (dynamic) default, here made fixed
OPT_OUT = "MOETUNE_CPU_MEMORY"
_M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)


def apply() -> dict[str, str]:
    """Set what is not set yet (see the module docstring); returns {setting: value} of what it set."""
    if os.environ.get(OPT_OUT, "").lower() == "keep":
        return {}
    done: dict[str, str] = {}
    for name in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY"):
        if name not in os.environ:
            os.environ[name] = done[name] = CACHE_CAPACITY
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ and _set_mmap_threshold(MMAP_THRESHOLD):
        done["mmap threshold"] = str(MMAP_THRESHOLD)
    return done


def _set_mmap_threshold(nbytes: int) -> bool:
    """glibc's mallopt(M_MMAP_THRESHOLD); False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, nbytes))
