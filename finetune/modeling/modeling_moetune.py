"""The built-in moetune architecture: a decoder-only Mixture-of-Experts transformer.

What it does, top to bottom:
- token embeddings (or `inputs_embeds`, which is how modality encoders enter as prefix embeddings);
- N decoder layers, each `x + attn(norm(x))` then `x + ffn(norm(x))`, with RMSNorm and rotary positions;
- attention is chosen per layer (`config.attention_type`): dense causal attention through
  transformers' attention functions (sdpa by default, GQA), or hierarchical sparse attention
  (local window + global block summaries + learned gate, see `sparse_attention.py`);
- the feed-forward is a dense MLP in the first `first_k_dense_replace` layers, else an MoE block:
  a linear router, softmax over experts, top-k (optionally renormalised), routed experts stored
  fused in the transformers v5 layout (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]) and
  dispatched through transformers' experts implementations (eager / batched_mm / grouped_mm),
  plus optional always-on shared experts;
- a Switch-style load-balancing loss (`aux_loss`), added to `loss` with `router_aux_loss_coef`.

Module names follow Qwen3-MoE / DeepSeek-V3 (`self_attn.q_proj`, `mlp.gate`, `mlp.experts`,
`mlp.shared_experts`) so one adapter code path serves this model and the transformers families.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.integrations import use_experts_implementation
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen3_moe.modeling_qwen3_moe import (
    eager_attention_forward,
    load_balancing_loss_func,
)
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .attention_projections import add_qkvo_projections, project_qkv
from .configuration_moetune import MoetuneConfig
from .sparse_attention import HierarchicalSparseAttention


class MoetuneRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class MoetuneRotaryEmbedding(nn.Module):
    def __init__(self, config: MoetuneConfig) -> None:
        super().__init__()
        self.head_dim, self.rope_theta = config.head_dim, config.rope_theta
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        steps = torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim
        return 1.0 / (self.rope_theta**steps)  # (D/2,)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class MoetuneAttention(nn.Module):
    """Dense causal multi-head attention with GQA, dispatched through transformers (sdpa by default)."""

    def __init__(self, config: MoetuneConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        add_qkvo_projections(self, config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        query, key, value = project_qkv(self, hidden_states, position_embeddings, cache)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        kwargs.pop("padding_mask", None)
        kwargs.pop("position_ids", None)
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.config.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class MoetuneMLP(nn.Module):
    """SwiGLU MLP: the dense layers and the shared experts."""

    def __init__(self, config: MoetuneConfig, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@use_experts_implementation
class MoetuneExperts(nn.Module):
    """Routed experts stored fused: gate_up_proj (E, 2I, H) and down_proj (E, H, I).

    The forward below is the eager reference; `config._experts_implementation` swaps in
    transformers' batched_mm or grouped_mm, which compute the same thing.
    """

    def __init__(self, config: MoetuneConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(
            torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim)
        )
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        # hidden_states (N, H); top_k_index / top_k_weights (N, k)
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hit = torch.unique(top_k_index)  # only the experts that received tokens
        for expert in hit.tolist():
            token_idx, slot = torch.where(top_k_index == expert)
            gate, up = F.linear(hidden_states[token_idx], self.gate_up_proj[expert]).chunk(2, dim=-1)
            out = F.linear(self.act_fn(gate) * up, self.down_proj[expert])  # (n_e, H)
            out = out * top_k_weights[token_idx, slot, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


class MoetuneRouter(nn.Module):
    """Linear router: softmax over experts, top-k, optional renormalisation."""

    def __init__(self, config: MoetuneConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.zeros(self.num_experts, config.hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        router_logits = F.linear(hidden_states, self.weight)  # (N, E)
        probs = F.softmax(router_logits, dtype=torch.float, dim=-1)
        top_weights, top_index = torch.topk(probs, self.top_k, dim=-1)  # (N, k)
        if self.norm_topk_prob:
            top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
        return router_logits, top_weights.to(router_logits.dtype), top_index


class MoetuneSparseMoeBlock(nn.Module):
    def __init__(self, config: MoetuneConfig) -> None:
        super().__init__()
        self.gate = MoetuneRouter(config)
        self.experts = MoetuneExperts(config)
        self.shared_experts = (
            MoetuneMLP(config, config.moe_intermediate_size * config.num_shared_experts)
            if config.num_shared_experts > 0
            else None
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = hidden_states.shape
        flat = hidden_states.reshape(-1, hidden)  # (B*T, H)
        _, top_weights, top_index = self.gate(flat)
        out = self.experts(flat, top_index, top_weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.reshape(batch, length, hidden)


class MoetuneDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MoetuneConfig, layer_idx: int) -> None:
        super().__init__()
        attention_cls = {"dense": MoetuneAttention, "hierarchical_sparse": HierarchicalSparseAttention}
        self.self_attn = attention_cls[config.layer_attention_types[layer_idx]](config, layer_idx)
        self.mlp = (
            MoetuneSparseMoeBlock(config)
            if config.is_moe_layer(layer_idx)
            else MoetuneMLP(config, config.intermediate_size)
        )
        self.input_layernorm = MoetuneRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MoetuneRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        padding_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
            padding_mask=padding_mask,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class MoetunePreTrainedModel(PreTrainedModel):
    config_class = MoetuneConfig
    config: MoetuneConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MoetuneDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "router_logits": OutputRecorder(MoetuneRouter, index=0),
        "hidden_states": MoetuneDecoderLayer,
    }

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, MoetuneExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, MoetuneRouter):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, MoetuneRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, MoetuneRotaryEmbedding):
            # Non-persistent buffer: from_pretrained builds on the meta device, so recompute it here.
            init.copy_(module.inv_freq, module.compute_inv_freq())


class MoetuneModel(MoetunePreTrainedModel):
    def __init__(self, config: MoetuneConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(MoetuneDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = MoetuneRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MoetuneRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> MoeModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen
            position_ids = position_ids.unsqueeze(0)

        # Only dense layers read the 4D causal mask; sparse layers build their own from `padding_mask`
        # and `position_ids`. For packed input the mask is T x T (400 MiB at 20480 tokens): skip it
        # when no layer needs it.
        causal_mask = None
        if "dense" in self.config.layer_attention_types:
            causal_mask = create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
            )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)  # (B, T, D) each
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                cache=cache,
                position_embeddings=position_embeddings,
                padding_mask=attention_mask,
                **kwargs,
            )
        return MoeModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)


class MoetuneForCausalLM(MoetunePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoetuneConfig) -> None:
        super().__init__(config)
        self.model = MoetuneModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits or labels is not None
        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
        aux_loss = None
        if output_router_logits and outputs.router_logits:
            aux_loss = load_balancing_loss_func(
                outputs.router_logits,
                self.config.num_experts,
                self.config.num_experts_per_tok,
                attention_mask,
            )
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            router_logits=outputs.router_logits,
        )
