"""Cross-modal fusion on top of the built-in MoE decoder (`model_type = "moetune_multimodal"`).

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

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, ProcessorMixin
from transformers.cache_utils import Cache
from transformers.modeling_outputs import ModelOutput
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from .configuration_moetune import MoetuneConfig
from .encoders import (
    ENCODER_PRESETS,
    MODALITIES,
    audio_features,
    build_encoder,
    count_parameters,
    encoder_width,
    image_features,
    load_pretrained_encoder,
    resolve_encoder_entry,
    text_features,
)
from .modeling_moetune import MoetuneModel, MoetunePreTrainedModel
from .presets import PRESETS

# Per-preset multimodal defaults: input sizes and prefix tokens per modality.
MULTIMODAL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(image_size=64, prefix_tokens={"image": 9, "audio": 4, "text": 4}, text_max_length=64),
    "small": dict(image_size=128, prefix_tokens={"image": 9, "audio": 4, "text": 4}, text_max_length=128),
    "full": dict(image_size=224, prefix_tokens={"image": 16, "audio": 8, "text": 8}, text_max_length=512),
}


class MoetuneMultimodalConfig(MoetuneConfig):
    r"""The MoE decoder plus modality encoders, fusion and a multi-label head.

    Args (besides those of `MoetuneConfig`):
        modalities: encoders to build, a subset of ("image", "audio", "text"), in prefix order.
        encoder_configs: modality -> transformers config dict with `model_type` (random init), or a local
            pretrained folder (path string or `{"pretrained": path}`), resolved to a dict at construction.
        fusion_dim: width of the shared space (512).
        num_labels_mm: classes of the multi-label head (0 = no head); `mm_label_names` names them.
        prefix_tokens: modality -> decoder prefix tokens it contributes (image: a square number, a grid).
        contrastive_pairs: modality pairs aligned by InfoNCE; None = every pair of configured modalities.
        contrastive_loss_coef / classification_loss_coef: weights of those losses in `loss`. The contrastive
            weight defaults to 0.1: where the pairs are not one-to-one (a plot and its poster), a full-weight
            InfoNCE swamps the classification / LM losses that share the projections; alone (mm-align) the
            weight does not matter to AdamW.
        logit_scale_init / logit_scale_max: initial value of the log inverse temperature (CLIP: ln(1/0.07))
            and the cap of its exponential.
        image_size: side of the square images fed to the image encoder (the image processor resizes to it).
        audio_sampling_rate: rate the audio encoder expects; files at other rates are resampled.
        text_max_length: longest text the text encoder sees.
        freeze_batchnorm: keep the image encoder's BatchNorm layers in eval mode during training, so a
            frozen encoder's running statistics (which an adapter does not save) never drift.
        fusion_gate_floor: share of the fusion weight spread evenly over the present modalities (0 = a pure
            learned softmax); keeps every present modality in the fused embedding.
    """

    model_type = "moetune_multimodal"

    def __init__(
        self,
        modalities: list[str] | None = None,
        encoder_configs: dict[str, Any] | None = None,
        fusion_dim: int = 512,
        num_labels_mm: int = 0,
        mm_label_names: list[str] | None = None,
        prefix_tokens: dict[str, int] | None = None,
        contrastive_pairs: list[list[str]] | None = None,
        contrastive_loss_coef: float = 0.1,
        classification_loss_coef: float = 1.0,
        logit_scale_init: float = math.log(1 / 0.07),
        logit_scale_max: float = 100.0,
        image_size: int = 224,
        audio_sampling_rate: int = 16000,
        text_max_length: int = 128,
        freeze_batchnorm: bool = True,
        fusion_gate_floor: float = 0.5,
        **kwargs,
    ) -> None:
        modalities = list(modalities or [])
        encoder_configs = dict(encoder_configs or {})
        resolved = {
            m: resolve_encoder_entry(m, encoder_configs[m]) for m in modalities if m in encoder_configs
        }
        if mm_label_names:
            mm_label_names = [str(n) for n in mm_label_names]
            if num_labels_mm and num_labels_mm != len(mm_label_names):
                raise ValueError(
                    f"num_labels_mm={num_labels_mm} but mm_label_names has {len(mm_label_names)} names; "
                    "drop num_labels_mm or make them agree"
                )
            num_labels_mm = len(mm_label_names)
        self.mm_label_names = list(mm_label_names or [])
        self.prefix_tokens = {m: 4 for m in MODALITIES} | dict(prefix_tokens or {})
        self.contrastive_pairs = (
            [list(p) for p in contrastive_pairs] if contrastive_pairs is not None else None
        )
        self.contrastive_loss_coef = contrastive_loss_coef
        self.classification_loss_coef = classification_loss_coef
        self.logit_scale_init = logit_scale_init
        self.logit_scale_max = logit_scale_max
        self.image_size = image_size
        self.audio_sampling_rate = audio_sampling_rate
        self.text_max_length = text_max_length
        self.freeze_batchnorm = freeze_batchnorm
        self.fusion_gate_floor = fusion_gate_floor
        super().__init__(
            modalities=modalities,
            encoder_configs={**encoder_configs, **resolved},
            fusion_dim=fusion_dim,
            num_labels_mm=num_labels_mm,
            **kwargs,
        )

    def _check(self) -> None:
        super()._check()
        for m in self.modalities:
            if m not in MODALITIES:
                raise ValueError(f"modality {m!r} is not one of {MODALITIES}")
            if m not in self.encoder_configs:
                raise ValueError(f"modality {m!r} has no entry in encoder_configs; add its config or folder")
            if self.prefix_tokens.get(m, 0) < 1:
                raise ValueError(f"prefix_tokens[{m!r}] must be >= 1")
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities {self.modalities} repeat a modality")
        grid = math.isqrt(self.prefix_tokens["image"])
        if "image" in self.modalities and grid * grid != self.prefix_tokens["image"]:
            raise ValueError(f"prefix_tokens['image']={self.prefix_tokens['image']} must be a square (grid)")
        for pair in self.contrastive_pairs or []:
            if len(pair) != 2 or pair[0] == pair[1] or any(m not in self.modalities for m in pair):
                raise ValueError(f"contrastive pair {pair} must name two different configured modalities")

    @property
    def aligned_pairs(self) -> list[tuple[str, str]]:
        if self.contrastive_pairs is not None:
            return [(a, b) for a, b in self.contrastive_pairs]
        return list(itertools.combinations(self.modalities, 2))


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
            embeds=embeds, present=present, fused=fused, gate_weights=gate_weights, tokens=tokens,
            token_mask=token_mask,
        )  # fmt: skip

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
            pixel_values, image_mask, input_values, audio_attention_mask, audio_mask,
            text_input_ids, text_attention_mask, text_mask,
        )  # fmt: skip
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
            pixel_values, image_mask, input_values, audio_attention_mask, audio_mask,
            text_input_ids, text_attention_mask, text_mask,
        )  # fmt: skip
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


# ----------------------------------------------------------------------------- processor


class MoetuneMultimodalProcessor(ProcessorMixin):
    """Image processor + audio feature extractor + tokenizer (+ the text encoder's tokenizer).

    Saved into the model folder with `save_pretrained` (`processor_config.json` holds the image and audio
    settings, the tokenizers their own files) and loaded with `AutoProcessor.from_pretrained(folder)`.
    All three sub-processors are always present; `modalities` says which ones the model uses, and
    `label_names` the classes of the multi-label head (in order).
    """

    def __init__(
        self,
        image_processor,
        feature_extractor,
        tokenizer,
        text_encoder_tokenizer,
        modalities: list[str] | None = None,
        text_max_length: int = 128,
        label_names: list[str] | None = None,
        **kwargs,
    ) -> None:
        self.modalities = list(modalities or [])
        self.text_max_length = text_max_length
        self.label_names = list(label_names or [])
        super().__init__(image_processor, feature_extractor, tokenizer, text_encoder_tokenizer, **kwargs)

    @property
    def sampling_rate(self) -> int:
        return int(self.feature_extractor.sampling_rate)

    def prompt_ids(self, text: str | None) -> list[int]:
        """Decoder prompt: [bos] + tokens of `text` (the same layout for training and generation)."""
        ids = self.tokenizer(text or "", add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        return ([bos] if bos is not None else []) + list(ids)

    def target_ids(self, text: str) -> list[int]:
        """Decoder target: tokens of `text` + [eos]."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        return list(ids) + ([eos] if eos is not None else [])

    def text_encoder_ids(self, text: str) -> list[int]:
        """Tokens the text encoder sees (its tokenizer, truncated to text_max_length)."""
        tok = self.text_encoder_tokenizer
        ids = tok(text, add_special_tokens=tok is not self.tokenizer, truncation=True,
                  max_length=self.text_max_length)["input_ids"]  # fmt: skip
        return list(ids)[: self.text_max_length] or [tok.pad_token_id or 0]

    def images_to_pixels(self, images: list) -> torch.Tensor:
        """PIL images / HWC uint8 arrays -> pixel_values (n, 3, H, W) float32."""
        return self.image_processor(images, return_tensors="pt")["pixel_values"]

    def audio_to_values(self, waveforms: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Mono float waveforms at `sampling_rate` -> input_values (n, S) and attention mask (n, S)."""
        out = self.feature_extractor(
            waveforms, sampling_rate=self.sampling_rate, padding=True, return_attention_mask=True,
            return_tensors="pt",
        )  # fmt: skip
        return out["input_values"], out["attention_mask"]


def build_processor(config: MoetuneMultimodalConfig, tokenizer, text_encoder_tokenizer=None):
    """The processor for `config`: from the encoders' pretrained folders where they have one, else
    a ViT-style PIL image processor (resize to image_size x image_size, ImageNet mean/std) and a
    Wav2Vec2 feature extractor at `audio_sampling_rate`; the text encoder shares the decoder's tokenizer
    unless its pretrained folder carries its own."""
    from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoTokenizer, Wav2Vec2FeatureExtractor
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    def folder(modality: str, filename: str) -> str | None:
        path = config.encoder_configs.get(modality, {}).get("pretrained")
        return path if path and (Path(path) / filename).is_file() else None

    if path := folder("image", "preprocessor_config.json"):
        image_processor = AutoImageProcessor.from_pretrained(path)
    else:
        size = config.image_size
        image_processor = ViTImageProcessorPil(
            size={"height": size, "width": size}, image_mean=list(IMAGENET_DEFAULT_MEAN),
            image_std=list(IMAGENET_DEFAULT_STD),
        )  # fmt: skip
    if path := folder("audio", "preprocessor_config.json"):
        feature_extractor = AutoFeatureExtractor.from_pretrained(path)
        feature_extractor.return_attention_mask = True
    else:
        feature_extractor = Wav2Vec2FeatureExtractor(
            feature_size=1, sampling_rate=config.audio_sampling_rate, padding_value=0.0, do_normalize=True,
            return_attention_mask=True,
        )  # fmt: skip
    if text_encoder_tokenizer is None:
        path = folder("text", "tokenizer_config.json")
        text_encoder_tokenizer = AutoTokenizer.from_pretrained(path) if path else tokenizer
    return MoetuneMultimodalProcessor(
        image_processor, feature_extractor, tokenizer, text_encoder_tokenizer,
        modalities=config.modalities, text_max_length=config.text_max_length, label_names=config.mm_label_names,
    )  # fmt: skip


def prepare_multimodal_inputs(processor, text: str | None, image=None, audio=None) -> dict[str, torch.Tensor]:
    """Inputs for `model.generate(**inputs)` from a prompt and an optional image / audio.

    image: a path or a PIL image; audio: a path, or (samples, sampling_rate). The prompt is laid out as in
    training ([bos] + prompt tokens) and also goes to the text encoder when the model has one. The new
    tokens are `output[:, inputs["input_ids"].shape[1]:]`. Raises ValueError (MediaError for a file that
    cannot be read) with a one-line message.
    """
    import numpy as np

    from .media import load_audio, load_image, resample

    modalities = set(getattr(processor, "modalities", []) or [])
    for name, value in (("image", image), ("audio", audio)):
        if value is not None and name not in modalities:
            raise ValueError(
                f"--{name} given but the model has no {name} encoder (modalities: {sorted(modalities)})"
            )
    ids = processor.prompt_ids(text or "")
    inputs: dict[str, torch.Tensor] = {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
    }
    if image is not None:
        if isinstance(image, (str, Path)):
            image = load_image(Path(image))
        inputs["pixel_values"] = processor.images_to_pixels([image])
    if audio is not None:
        if isinstance(audio, (str, Path)):
            wave = load_audio(Path(audio), processor.sampling_rate)
        else:
            samples, rate = audio
            wave = resample(
                np.asarray(samples, dtype=np.float32).reshape(-1), int(rate), processor.sampling_rate
            )
        inputs["input_values"], inputs["audio_attention_mask"] = processor.audio_to_values([wave])
    if text and "text" in modalities:
        text_ids = processor.text_encoder_ids(text)
        inputs["text_input_ids"] = torch.tensor([text_ids], dtype=torch.long)
        inputs["text_attention_mask"] = torch.ones(1, len(text_ids), dtype=torch.long)
    return inputs


# ----------------------------------------------------------------------------- configs from presets


def multimodal_config(preset_name: str, modalities, **overrides) -> MoetuneMultimodalConfig:
    """The `preset_name` decoder with encoders for `modalities` (e.g. ["image", "audio", "text"]).

    `overrides` may set any config field; `encoder_configs={"image": FOLDER_OR_DICT}` replaces or
    updates (dict entries are merged into the preset's) the encoder of that modality.
    """
    if preset_name not in PRESETS:
        raise KeyError(preset_name)
    if isinstance(modalities, str):
        modalities = [m.strip() for m in modalities.split(",") if m.strip()]
    modalities = list(modalities)
    for m in modalities:
        if m not in MODALITIES:
            raise ValueError(f"modality {m!r} is not one of {MODALITIES}")
    fields: dict[str, Any] = {**PRESETS[preset_name], **MULTIMODAL_PRESETS[preset_name]}
    given = dict(overrides.pop("encoder_configs", None) or {})
    encoders: dict[str, Any] = {}
    vocab = overrides.get("vocab_size", fields["vocab_size"])
    for m in modalities:
        entry = dict(ENCODER_PRESETS[preset_name][m])
        if m == "text":
            entry["vocab_size"] = vocab  # the text encoder shares the decoder's tokenizer by default
        spec = given.get(m)
        if (
            isinstance(spec, dict)
            and "pretrained" not in spec
            and spec.get("model_type", entry["model_type"]) == entry["model_type"]
        ):
            entry.update(spec)
        elif spec is not None:
            entry = spec
        encoders[m] = entry
    if "prefix_tokens" in overrides:
        overrides["prefix_tokens"] = {**fields["prefix_tokens"], **overrides["prefix_tokens"]}
    fields.update(overrides)
    return MoetuneMultimodalConfig(modalities=modalities, encoder_configs=encoders, **fields)


def describe_encoders(model_or_config) -> list[dict[str, Any]]:
    """One row per encoder for `moetune info`: modality, model_type, width, source, parameters (when built)."""
    config = getattr(model_or_config, "config", model_or_config)
    encoders = getattr(model_or_config, "encoders", None)
    rows = []
    for m in getattr(config, "modalities", []) or []:
        entry = config.encoder_configs[m]
        from .encoders import encoder_config

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
    "MULTIMODAL_PRESETS",
    "MoetuneMultimodalConfig",
    "MoetuneMultimodalForCausalLM",
    "MoetuneMultimodalOutput",
    "MoetuneMultimodalProcessor",
    "build_processor",
    "describe_encoders",
    "multimodal_config",
    "prepare_multimodal_inputs",
    "symmetric_info_nce",
]
