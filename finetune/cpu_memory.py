"""Process settings that keep a CPU LoRA step's peak memory near its tensors.

A routed-experts step runs one GEMM per hit expert, and every expert receives a different number of
tokens, so almost every GEMM has a shape the step has not seen before. ideep's LRU cache of matmul
primitives (`LRU_CACHE_CAPACITY`, 1024 entries by default) and oneDNN's own primitive cache
(`ONEDNN_PRIMITIVE_CACHE_CAPACITY`, 1024) then fill with one entry per shape: about 0.25 GiB that no
tensor holds and that a later step rarely reuses (its experts get other token counts). Measured with
benchmarks/quantized_peak_anatomy.py on the quantized-experts benchmark model (NF4 experts, 3 LoRA
steps of 1 x 256 tokens): capping both at 64 entries (the non-expert GEMMs of a step fit) took the
step's peak from 1,452 to 761 MiB above the baseline; the speed cost is measured in
benchmarks/quantized_experts.py.

What was tried and not kept: fixing glibc's mmap threshold at 128 KiB (`MALLOC_MMAP_THRESHOLD_`)
saves another ~130 MiB of fragmented heap at the peak, but made a 1 x 2048-token step 2.2-2.8x slower
(every large block is mapped and faulted in afresh); set it yourself where memory matters more.

Both are defaults: a value set in the environment wins, and `MOETUNE_CPU_MEMORY=keep` leaves them
alone. ideep reads its variable when torch loads, so `import finetune` must come before `import
torch` for that one (the `moetune` command and `python -m finetune.train` do this); oneDNN reads its
own at the first matmul.

Standard library only: this runs before torch is imported.
"""

from __future__ import annotations

import os

CACHE_CAPACITY = "64"
CACHES = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")
OPT_OUT = "MOETUNE_CPU_MEMORY"


def apply() -> dict[str, str]:
    """Set what is not set yet (see the module docstring); returns {variable: value} of what it set."""
    if os.environ.get(OPT_OUT, "").lower() == "keep":
        return {}
    done: dict[str, str] = {}
    for name in CACHES:
        if name not in os.environ:
            os.environ[name] = done[name] = CACHE_CAPACITY
    return done
