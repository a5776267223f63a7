"""Configuration of the built-in moetune architecture (`model_type = "moetune"`)."""

from __future__ import annotations

from transformers import PreTrainedConfig

ATTENTION_TYPES = ("dense", "hierarchical_sparse")


class MoetuneConfig(PreTrainedConfig):
    r"""Decoder-only MoE transformer with swappable attention and optional modality encoders.

    Args:
        vocab_size: tokens in the vocabulary.
        hidden_size: width of the residual stream.
        intermediate_size: width of the dense MLP used in the leading dense layers.
        moe_intermediate_size: width of one routed expert.
        num_hidden_layers: decoder layers.
        num_attention_heads / num_key_value_heads / head_dim: attention shape (GQA when kv < heads).
        max_position_embeddings: longest sequence the rotary table is sized for.
        rope_theta: rotary base.
        num_experts: routed experts per MoE layer (128 in `small` and `full`).
        num_experts_per_tok: experts each token is routed to (top-k).
        norm_topk_prob: renormalise the top-k softmax weights to sum to 1.
        num_shared_experts: always-on experts (one MLP of width num_shared_experts * moe_intermediate_size).
        first_k_dense_replace: the first k layers use a dense MLP instead of MoE.
        router_aux_loss_coef: weight of the Switch load-balancing loss added to `loss` when labels are given.
        output_router_logits: return router logits (and the aux loss) by default.
        attention_type: "dense", "hierarchical_sparse", or a list with one of these per layer.
        local_window: tokens in the causal local window of hierarchical sparse attention.
        global_ratio: share of the sequence carried by global tokens (block summaries).
        modalities: modality encoders fused as prefix embeddings (subset of image, audio, text); empty = text-only.
        encoder_configs: per-modality transformers config dicts (or local pretrained folder paths).
        fusion_dim: width of the shared space the modality projections map into.
        num_labels_mm: classes of the optional multi-label classification head (0 = none).
    """

    model_type = "moetune"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 1024,
        hidden_size: int = 64,
        intermediate_size: int = 128,
        moe_intermediate_size: int = 32,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 4096,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        rope_theta: float = 10000.0,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        num_experts: int = 8,
        num_experts_per_tok: int = 2,
        norm_topk_prob: bool = True,
        num_shared_experts: int = 0,
        first_k_dense_replace: int = 0,
        router_aux_loss_coef: float = 0.01,
        output_router_logits: bool = False,
        attention_type: str | list[str] = "dense",
        local_window: int = 8,
        global_ratio: float = 0.1,
        modalities: list[str] | None = None,
        encoder_configs: dict | None = None,
        fusion_dim: int = 512,
        num_labels_mm: int = 0,
        pad_token_id: int | None = 0,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.norm_topk_prob = norm_topk_prob
        self.num_shared_experts = num_shared_experts
        self.first_k_dense_replace = first_k_dense_replace
        self.router_aux_loss_coef = router_aux_loss_coef
        self.output_router_logits = output_router_logits
        self.attention_type = attention_type
        self.local_window = local_window
        self.global_ratio = global_ratio
        self.modalities = list(modalities or [])
        self.encoder_configs = dict(encoder_configs or {})
        self.fusion_dim = fusion_dim
        self.num_labels_mm = num_labels_mm
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self._check()

    def _check(self) -> None:
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} > num_experts={self.num_experts}; "
                "lower num_experts_per_tok"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        for kind in self.layer_attention_types:
            if kind not in ATTENTION_TYPES:
                raise ValueError(f"attention_type {kind!r} is not one of {ATTENTION_TYPES}")
        if isinstance(self.attention_type, list) and len(self.attention_type) != self.num_hidden_layers:
            raise ValueError(
                f"attention_type lists {len(self.attention_type)} layers but num_hidden_layers="
                f"{self.num_hidden_layers}; give one entry per layer or a single string"
            )

    @property
    def layer_attention_types(self) -> list[str]:
        """The attention kind of each layer."""
        if isinstance(self.attention_type, str):
            return [self.attention_type] * self.num_hidden_layers
        return list(self.attention_type)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace and self.num_experts > 0
