"""Configuration of the multimodal model (`model_type = "moetune_multimodal"`): the MoE decoder's
settings plus the modality encoders, the shared fusion space, the prefix tokens and the losses.
`multimodal_config` builds one from a preset. The model is `modeling_moetune_multimodal.py`, its
processor `processing_moetune_multimodal.py` (transformers' configuration / modeling / processing split).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from .configuration_moetune import MoetuneConfig
from .encoders import ENCODER_PRESETS, MODALITIES, resolve_encoder_entry
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


__all__ = ["MULTIMODAL_PRESETS", "MoetuneMultimodalConfig", "multimodal_config"]
