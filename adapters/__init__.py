"""LoRA adapters for Mixture-of-Experts models, model-agnostic (any transformers MoE family)."""

from adapters.errors import MoetuneError

__all__ = ["MoetuneError"]
