"""Cross-modal fusion on top of the built-in MoE decoder (`model_type = "moetune_multimodal"`).

The model; its configuration is `configuration_moetune_multimodal.py`, its processor
`processing_moetune_multimodal.py`.

What the model does, top to bottom (shapes per batch of B examples, M configured modalities):
- each modality present in an example is encoded by its transformers encoder (`encoders.<modality>`:
  ResNet / Wav2Vec 2.0 / BERT, see `encoders.py`); absent rows are never run through the encoder;
- `projectors.<modality>` (Linear -> GELU -> Linear) maps the pooled feature (B, C_m) and a few feature
  tokens (B, k_m, C_m) into the shared space of width `fusion_dim` (512);
- `contrastive` holds a learnable temperature and computes a symmetric InfoNCE loss between the pooled
  embeddings of every configured modality pair, over the examples that have both;
- `fusion_gate` mixes the pooled embeddings (B, M, D) with softmax weights whose logits depend on the
  content and on which modalities are present; absent ones get -inf (masked out, never zero-filled);
- the prefix = [fused token, modality tokens...] (B, P, D) -> `prefix_projector` -> (B, P, hidden) is
  placed before the text embeddings; absent slots are masked in attention and get no position;
- the MoE decoder (`model`, `lm_head`, exactly the text model's modules) continues with the text, so a
  caption, transcript or answer is generated; `classifier` maps the fused embedding to multi-label logits.

The output carries `loss` (the weighted sum) and each part alone: `lm_loss`, `aux_loss` (MoE load
balancing), `contrastive_loss`, `classification_loss`.

Module names, for adapter targeting: encoders live under `encoders.<modality>.`, the multimodal glue is
`projectors.<modality>`, `prefix_projector`, `fusion_gate`, `contrastive`, `classifier`; the decoder keeps
the text model's names (`model.layers.N.self_attn.q_proj`, `model.layers.N.mlp.experts`, `lm_head`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin
from transformers.cache_utils import Cache
from transformers.modeling_outputs import ModelOutput
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from .configuration_moetune_multimodal import MoetuneMultimodalConfig
from .encoders import (
    audio_features,
    build_encoder,
    count_parameters,
    encoder_config,
    encoder_width,
    image_features,
    load_pretrained_encoder,
    text_features,
)
from .modeling_moetune import MoetuneModel, MoetunePreTrainedModel

# ----------------------------------------------------------------------------- fusion modules


class MoetuneProjector(nn.Module):
    """One modality's encoder features -> the shared space: LayerNorm -> Linear -> GELU -> Linear.

    The LayerNorm puts every encoder (post-ReLU ResNet maps, Wav2Vec2 / BERT states) on one scale;
    the linears are Xavier-initialised so the image / audio / text differences survive the projection.
    """

    def __init__(self, in_features: int, fusion_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_features)
        self.linear_1 = nn.Linear(in_features, fusion_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(fusion_dim, fusion_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.norm(features))))


class MoetuneFusionGate(nn.Module):
    """Softmax weights over the modalities present in each example.

    logit_m = score(z_m) + presence(present)_m, where `presence` sees the presence pattern (B, M), so the
    weights depend on which modalities are there as well as on their content; absent modalities get -inf,
    so they receive exactly zero weight and no gradient. A share `floor` of the weight is spread evenly
    over the present modalities, so the gate cannot shut a modality out for good early in training (the
    modality that is informative first would otherwise take all the weight and starve the others).
    """

    def __init__(self, num_modalities: int, fusion_dim: int, floor: float = 0.5) -> None:
        super().__init__()
        self.score = nn.Linear(fusion_dim, 1)
        self.presence = nn.Linear(num_modalities, num_modalities)
        self.floor = floor

    def forward(self, embeds: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # embeds (B, M, D); present (B, M) bool
        embeds = embeds.masked_fill(~present.unsqueeze(-1), 0.0)
        logits = self.score(embeds).squeeze(-1) + self.presence(present.to(embeds.dtype))  # (B, M)
        logits = logits.masked_fill(~present, float("-inf"))
        weights = torch.softmax(logits.float(), dim=-1).nan_to_num(0.0)  # rows with no modality -> 0
        even = present.float() / present.float().sum(-1, keepdim=True).clamp(min=1)
        weights = ((1 - self.floor) * weights + self.floor * even).to(embeds.dtype)
        fused = torch.einsum("bm,bmd->bd", weights, embeds)  # (B, D)
        return fused, weights


class MoetuneContrastive(nn.Module):
    """Symmetric InfoNCE (CLIP) between two batches of paired embeddings, with a learnable temperature."""

    def __init__(self, logit_scale_init: float, logit_scale_max: float) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
        self.logit_scale_init = logit_scale_init
        self.max_log = math.log(logit_scale_max)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # a, b (n, D): row i of a is paired with row i of b
        scale = self.logit_scale.clamp(max=self.max_log).exp()
        logits = scale * F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T  # (n, n)
        target = torch.arange(a.shape[0], device=a.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        return loss, scale.detach()


def symmetric_info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """The contrastive loss as a plain function (for evaluation and tests): logit_scale is log(1/T)."""
    logits = logit_scale.exp() * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
    target = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


@dataclass
class MultimodalEncoding(ModelOutput):
    """What `encode` returns: per-modality pooled embeddings, presence, fusion, and prefix tokens.

    embeds (B, M, D) pooled shared-space embeddings (rows of absent modalities are placeholders, never
    used); present (B, M) bool; fused (B, D); gate_weights (B, M); tokens (B, P, D) prefix tokens in the
    shared space, left-packed per row (absent slots first, then the fused token and the modality tokens
    in order), and token_mask (B, P) their validity.
    """

    embeds: torch.Tensor | None = None
    present: torch.Tensor | None = None
    fused: torch.Tensor | None = None
    gate_weights: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None


@dataclass
class MoetuneMultimodalOutput(ModelOutput):
    """Output of `MoetuneMultimodalForCausalLM`.

    loss: lm_loss + router_aux_loss_coef * aux_loss + contrastive_loss_coef * contrastive_loss
        + classification_loss_coef * classification_loss, over the parts that exist for this batch.
    logits (B, P + T, V): over the prefix slots and the text; `logits[:, prefix_length:]` lines up with
        `input_ids`. classification_logits (B, num_labels_mm). modality_embeds (B, M, D),
        modality_mask (B, M), fused_embeds (B, D), gate_weights (B, M), logit_scale (the exp'd scale).
    """

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    contrastive_loss: torch.Tensor | None = None
    classification_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    classification_logits: torch.Tensor | None = None
    modality_embeds: torch.Tensor | None = None
    modality_mask: torch.Tensor | None = None
    fused_embeds: torch.Tensor | None = None
    gate_weights: torch.Tensor | None = None
    logit_scale: torch.Tensor | None = None
    prefix_length: int | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


# ----------------------------------------------------------------------------- the model


class MoetuneMultimodalForCausalLM(MoetunePreTrainedModel, GenerationMixin):
    config_class = MoetuneMultimodalConfig
    config: MoetuneMultimodalConfig
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _no_split_modules = [
        "MoetuneDecoderLayer",
        "ResNetStage",
        "Wav2Vec2EncoderLayerStableLayerNorm",
        "BertLayer",
    ]

    def __init__(self, config: MoetuneMultimodalConfig) -> None:
        super().__init__(config)
        self.model = MoetuneModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.encoders = nn.ModuleDict(
            {m: build_encoder(config.encoder_configs[m]) for m in config.modalities}
        )
        self.projectors = nn.ModuleDict(
            {
                m: MoetuneProjector(encoder_width(self.encoders[m].config), config.fusion_dim)
                for m in self.encoders
            }
        )
        self.fusion_gate = MoetuneFusionGate(
            max(len(config.modalities), 1), config.fusion_dim, config.fusion_gate_floor
        )
        self.contrastive = MoetuneContrastive(config.logit_scale_init, config.logit_scale_max)
        self.prefix_projector = nn.Linear(config.fusion_dim, config.hidden_size)
        self.classifier = nn.Linear(config.fusion_dim, config.num_labels_mm) if config.num_labels_mm else None
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MoetuneContrastive):
            nn.init.constant_(module.logit_scale, module.logit_scale_init)
        elif isinstance(module, MoetuneProjector):
            for linear in (module.linear_1, module.linear_2):
                nn.init.xavier_uniform_(linear.weight)
                nn.init.zeros_(linear.bias)

    @classmethod
    def _from_config(cls, config, **kwargs):
        """A new model from its config: random init, then the weights of any pretrained encoder folder."""
        model = super()._from_config(config, **kwargs)
        model.load_pretrained_encoders()
        return model

    def load_pretrained_encoders(self) -> list[str]:
        """Copy weights from the local folders named in `encoder_configs[m]["pretrained"]`; returns them."""
        loaded = []
        for modality, encoder in self.encoders.items():
            folder = self.config.encoder_configs[modality].get("pretrained")
            if folder:
                load_pretrained_encoder(encoder, folder)
                loaded.append(folder)
        return loaded

    def set_label_names(self, names: list[str]) -> None:
        """Give the model a multi-label head for `names` (a new, randomly initialised one if the count changes)."""
        names = [str(n) for n in names]
        if self.classifier is None or self.classifier.out_features != len(names):
            reference = self.model.embed_tokens.weight
            head = nn.Linear(
                self.config.fusion_dim, len(names), device=reference.device, dtype=reference.dtype
            )
            nn.init.normal_(head.weight, std=self.config.initializer_range)
            nn.init.zeros_(head.bias)
            self.classifier = head
        self.config.mm_label_names = names
        self.config.num_labels_mm = len(names)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.config.freeze_batchnorm and "image" in self.encoders:
            for module in self.encoders["image"].modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    # -- encoders and fusion

    def encode(
        self,
        pixel_values: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        input_values: torch.Tensor | None = None,
        audio_attention_mask: torch.Tensor | None = None,
        audio_mask: torch.Tensor | None = None,
        text_input_ids: torch.Tensor | None = None,
        text_attention_mask: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> MultimodalEncoding | None:
        """Run the encoders on the rows that have each modality; None when no modality input was given.

        pixel_values (B, 3, H, W) + image_mask (B,); input_values (B, S) + audio_attention_mask (B, S) +
        audio_mask (B,); text_input_ids (B, L) + text_attention_mask (B, L) + text_mask (B,). A missing
        `*_mask` means every row has that modality.
        """
        given = {
            "image": (pixel_values, image_mask),
            "audio": (input_values, audio_mask),
            "text": (text_input_ids, text_mask),
        }
        for modality, (value, _) in given.items():
            if value is not None and modality not in self.encoders:
                raise ValueError(
                    f"got {modality} inputs but this model has no {modality} encoder (modalities: "
                    f"{self.config.modalities})"
                )
        inputs = [v for v, _ in given.values() if v is not None]
        if not inputs:
            return None
        batch, device = inputs[0].shape[0], inputs[0].device
        dtype = self.model.embed_tokens.weight.dtype
        dim = self.config.fusion_dim
        modalities = self.config.modalities
        pooled_list = [torch.zeros(batch, dim, dtype=dtype, device=device) for _ in modalities]
        present = torch.zeros(batch, len(modalities), dtype=torch.bool, device=device)
        token_list, token_masks = [], []
        for i, modality in enumerate(modalities):
            value, row_mask = given[modality]
            if value is None:
                continue
            rows = torch.ones(batch, dtype=torch.bool, device=device) if row_mask is None else row_mask.bool()
            idx = rows.nonzero().squeeze(1)  # only these rows run through the encoder
            if idx.numel() == 0:
                continue
            k = self.config.prefix_tokens[modality]
            encoder = self.encoders[modality]
            if modality == "image":
                pooled, tokens, tok_mask = image_features(encoder, value[idx].to(encoder.dtype), k)
            elif modality == "audio":
                samples = audio_attention_mask if audio_attention_mask is not None else torch.ones_like(value)
                pooled, tokens, tok_mask = audio_features(
                    encoder, value[idx].to(encoder.dtype), samples[idx].long(), k
                )
            else:
                attn = text_attention_mask if text_attention_mask is not None else torch.ones_like(value)
                pooled, tokens, tok_mask = text_features(encoder, value[idx], attn[idx].long(), k)
            projector = self.projectors[modality]
            pooled = projector(pooled.to(dtype))  # (n, D)
            tokens = projector(tokens.to(dtype))  # (n, k, D)
            pooled_list[i] = pooled_list[i].index_copy(0, idx, pooled)
            present[:, i] = rows
            token_list.append(tokens.new_zeros(batch, k, dim).index_copy(0, idx, tokens))
            token_masks.append(
                torch.zeros(batch, k, dtype=torch.bool, device=device).index_copy(0, idx, tok_mask)
            )
        embeds = torch.stack(pooled_list, dim=1)  # (B, M, D); absent rows stay placeholders, masked below
        fused, gate_weights = self.fusion_gate(embeds, present)
        any_present = present.any(dim=1, keepdim=True)  # (B, 1)
        tokens = torch.cat([fused.unsqueeze(1), *token_list], dim=1)  # (B, P, D)
        token_mask = torch.cat([any_present, *token_masks], dim=1)  # (B, P)
        # Left-pack each row: absent slots first, then the present ones in order, so the prefix looks like
        # ordinary left padding to every attention implementation (dense, sparse, flash).
        order = torch.sort(token_mask.to(torch.int8), dim=1, stable=True).indices  # (B, P)
        tokens = tokens.gather(1, order.unsqueeze(-1).expand_as(tokens))
        token_mask = token_mask.gather(1, order)
        return MultimodalEncoding(
            embeds=embeds,
            present=present,
            fused=fused,
            gate_weights=gate_weights,
            tokens=tokens,
            token_mask=token_mask,
        )

    def contrastive_loss(self, encoding: MultimodalEncoding) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Mean symmetric InfoNCE over the configured pairs with >= 2 examples having both modalities."""
        losses, scale = [], None
        for a, b in self.config.aligned_pairs:
            i, j = self.config.modalities.index(a), self.config.modalities.index(b)
            both = encoding.present[:, i] & encoding.present[:, j]
            if int(both.sum()) < 2:
                continue
            loss, scale = self.contrastive(encoding.embeds[both, i], encoding.embeds[both, j])
            losses.append(loss)
        if not losses:
            return None, scale
        return torch.stack(losses).mean(), scale

    def _decoder_inputs(
        self,
        encoding: MultimodalEncoding | None,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        labels: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, int]:
        """[prefix embeddings | text embeddings], their mask and labels (-100 on the prefix)."""
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)  # (B, T, H)
        if encoding is None:
            return inputs_embeds, attention_mask, labels, 0
        batch, length = inputs_embeds.shape[:2]
        prefix = self.prefix_projector(encoding.tokens).to(inputs_embeds.dtype)  # (B, P, H)
        plen = prefix.shape[1]
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=inputs_embeds.device)
        mask = torch.cat([encoding.token_mask.to(attention_mask.dtype), attention_mask], dim=1)
        if labels is not None:
            labels = torch.cat([labels.new_full((batch, plen), -100), labels], dim=1)
        return torch.cat([prefix, inputs_embeds], dim=1), mask, labels, plen

    # -- forward and generation

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        input_values: torch.Tensor | None = None,
        audio_attention_mask: torch.Tensor | None = None,
        audio_mask: torch.Tensor | None = None,
        text_input_ids: torch.Tensor | None = None,
        text_attention_mask: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        mm_labels: torch.Tensor | None = None,
        mm_label_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MoetuneMultimodalOutput:
        """Encode the modalities, fuse, and run the decoder on [prefix | text].

        Without `input_ids` / `inputs_embeds` only the encoders, the contrastive loss and the classifier
        run (alignment and classification need no decoder). mm_labels (B, num_labels_mm) multi-hot floats,
        mm_label_mask (B,) which rows carry labels.
        """
        config = self.config
        encoding = self.encode(
            pixel_values,
            image_mask,
            input_values,
            audio_attention_mask,
            audio_mask,
            text_input_ids,
            text_attention_mask,
            text_mask,
        )
        out = MoetuneMultimodalOutput()
        parts: list[torch.Tensor] = []

        if encoding is not None:
            out.modality_embeds, out.modality_mask = encoding.embeds, encoding.present
            out.fused_embeds, out.gate_weights = encoding.fused, encoding.gate_weights
            out.contrastive_loss, out.logit_scale = self.contrastive_loss(encoding)
            if out.contrastive_loss is not None and config.contrastive_loss_coef:
                parts.append(config.contrastive_loss_coef * out.contrastive_loss)
            if self.classifier is not None:
                out.classification_logits = self.classifier(encoding.fused)  # (B, C)
                rows = encoding.present.any(1)
                if mm_label_mask is not None:
                    rows = rows & mm_label_mask.bool()
                if mm_labels is not None and rows.any():
                    out.classification_loss = F.binary_cross_entropy_with_logits(
                        out.classification_logits[rows].float(), mm_labels[rows].float()
                    )
                    if config.classification_loss_coef:
                        parts.append(config.classification_loss_coef * out.classification_loss)

        if input_ids is not None or inputs_embeds is not None:
            embeds, mask, full_labels, plen = self._decoder_inputs(
                encoding, input_ids, attention_mask, inputs_embeds, labels
            )
            out.prefix_length = plen
            fresh = cache is None or cache.get_seq_length() == 0
            if position_ids is None and mask is not None and fresh:
                # Positions count real tokens only, exactly as `generate` numbers them.
                position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
            if output_router_logits is None:
                output_router_logits = config.output_router_logits or labels is not None
            decoded = self.model(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                output_router_logits=output_router_logits,
                **kwargs,
            )
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            out.logits = self.lm_head(decoded.last_hidden_state[:, keep, :])
            out.cache, out.hidden_states = decoded.cache, decoded.hidden_states
            out.router_logits = decoded.router_logits
            if full_labels is not None:
                out.lm_loss = self.loss_function(out.logits, full_labels, config.vocab_size, **kwargs)
                parts.append(out.lm_loss)
            if output_router_logits and decoded.router_logits:
                out.aux_loss = load_balancing_loss_func(
                    decoded.router_logits, config.num_experts, config.num_experts_per_tok, mask
                )
                if out.lm_loss is not None:
                    parts.append(config.router_aux_loss_coef * out.aux_loss.to(out.lm_loss.device))

        if parts:
            out.loss = torch.stack([p.float() for p in parts]).sum()
        return out

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        input_values: torch.Tensor | None = None,
        audio_attention_mask: torch.Tensor | None = None,
        audio_mask: torch.Tensor | None = None,
        text_input_ids: torch.Tensor | None = None,
        text_attention_mask: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        **kwargs,
    ):
        """`GenerationMixin.generate` with the modality prefix; returns [input_ids | new tokens] as usual.

        The prompt (`input_ids`, left-padded for batches) follows the prefix; with modality inputs the
        prefix + prompt go in as `inputs_embeds` and the KV cache carries them afterwards.
        """
        encoding = self.encode(
            pixel_values,
            image_mask,
            input_values,
            audio_attention_mask,
            audio_mask,
            text_input_ids,
            text_attention_mask,
            text_mask,
        )
        if encoding is None:
            return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if input_ids is None:
            bos = self.config.bos_token_id if self.config.bos_token_id is not None else 0
            input_ids = torch.full((encoding.tokens.shape[0], 1), bos, device=encoding.tokens.device)
        embeds, mask, _, _ = self._decoder_inputs(encoding, input_ids, attention_mask, None, None)
        result = super().generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        if isinstance(result, torch.Tensor):
            return torch.cat([input_ids, result], dim=1)
        result.sequences = torch.cat([input_ids, result.sequences], dim=1)
        return result


def describe_encoders(model_or_config) -> list[dict[str, Any]]:
    """One row per encoder for `moetune info`: modality, model_type, width, source, parameters (when built)."""
    config = getattr(model_or_config, "config", model_or_config)
    encoders = getattr(model_or_config, "encoders", None)
    rows = []
    for m in getattr(config, "modalities", []) or []:
        entry = config.encoder_configs[m]
        enc_cfg = encoder_config(entry)
        row = {
            "modality": m,
            "model_type": enc_cfg.model_type,
            "width": encoder_width(enc_cfg),
            "layers": getattr(enc_cfg, "num_hidden_layers", None)
            or sum(getattr(enc_cfg, "depths", []) or []),
            "source": entry.get("pretrained") or "config (random init)",
            "prefix_tokens": config.prefix_tokens[m],
        }
        if encoders is not None and m in encoders:
            row["params"] = count_parameters(encoders[m])
        rows.append(row)
    return rows


__all__ = [
    "MoetuneContrastive",
    "MoetuneFusionGate",
    "MoetuneMultimodalForCausalLM",
    "MoetuneMultimodalOutput",
    "MoetuneProjector",
    "MultimodalEncoding",
    "describe_encoders",
    "symmetric_info_nce",
]
