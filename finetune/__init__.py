"""moetune's model and training half. `import finetune` registers the built-in architecture.

It first applies the CPU memory settings of `finetune.cpu_memory` (before torch is imported, where
it is not yet: one of them is read when torch loads).
"""

from finetune import cpu_memory as _cpu_memory

_cpu_memory.apply()

from finetune import modeling as _modeling  # noqa: E402, F401  (registers the Auto classes)
from finetune.errors import MoetuneError  # noqa: E402
from finetune.loading import load_model  # noqa: E402

__all__ = ["MoetuneError", "load_model"]
