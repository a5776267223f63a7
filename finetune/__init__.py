"""moetune's model and training half. `import finetune` registers the built-in architecture."""

from finetune import modeling as _modeling  # noqa: F401  (registers the Auto classes)
from finetune.errors import MoetuneError
from finetune.loading import load_model

__all__ = ["MoetuneError", "load_model"]
