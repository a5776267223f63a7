"""Named sizes of the built-in architecture: `tiny` (tests), `small` (benchmarks), `full` (real scale)."""

from __future__ import annotations

from typing import Any

from .configuration_moetune import MoetuneConfig

# Formatter off for this table (the skip at its end): one block per preset, the same keys in the same
# order, so presets read side by side.
PRESETS: dict[str, dict[str, Any]] = {
    # A few layers, 8 experts top-2: forward + backward in milliseconds on a CPU.
    "tiny": dict(
        vocab_size=1024, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=8, num_experts_per_tok=2, num_shared_experts=1, first_k_dense_replace=0,
        max_position_embeddings=4096,
    ),
    # Benchmarks: the real expert count (128, top-8) at small widths, 4 layers.
    "small": dict(
        vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
        num_experts=128, num_experts_per_tok=8, num_shared_experts=1, first_k_dense_replace=0,
        max_position_embeddings=8192,
    ),
    # The real scale: 128 routed experts top-8 + 1 shared, ~16B total parameters. Built on the meta
    # device for inspection (`moetune info preset:full`); materialised only on GPUs.
    "full": dict(
        vocab_size=65536, hidden_size=2048, intermediate_size=8192, moe_intermediate_size=1024,
        num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, num_shared_experts=1, first_k_dense_replace=1,
        max_position_embeddings=32768,
    ),
}  # fmt: skip

# Presets whose weights are never materialised on a CPU by accident.
META_ONLY_ON_CPU = {"full"}


def preset_config(name: str, **overrides: Any) -> MoetuneConfig:
    """The `MoetuneConfig` of preset `name`, with keyword overrides."""
    if name not in PRESETS:
        raise KeyError(name)
    return MoetuneConfig(**{**PRESETS[name], **overrides})
