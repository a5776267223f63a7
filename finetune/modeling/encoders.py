"""Modality encoders of the multimodal model, built through transformers.

- image: ResNet (`ResNetModel`; the ResNet-152 shape in the `full` preset),
- audio: Wav2Vec 2.0 (`Wav2Vec2Model`; the base widths in `full`),
- text: BERT (`BertModel`; the base widths in `full`).

An encoder is described by one JSON-able dict in `config.encoder_configs[modality]`: either
`{"model_type": "resnet", ...transformers config fields}` (random init), or a local pretrained folder
given as a path string or `{"pretrained": FOLDER, ...overrides}`. A folder is resolved when the config
is built: its `config.json` is copied into the dict (so a saved multimodal model never needs the folder
again) and `"pretrained"` keeps the path, from which `load_pretrained_encoder` copies the weights when
a model is created from its config (never when it is loaded from its own checkpoint).

Each modality also has a feature function that turns the encoder output into a pooled vector `(n, C)`
for alignment / fusion and a few tokens `(n, k, C)` (plus their validity mask `(n, k)`) that become
decoder prefix embeddings: a g x g grid of the image feature map, k equal time chunks of the audio
frames, k equal chunks of the text tokens. Padding never enters a pool.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel

MODALITIES = ("image", "audio", "text")

# Random-init encoder shapes per preset. Dropout / layerdrop / SpecAugment are off so that a frozen
# encoder is deterministic and every LoRA parameter receives a gradient under DDP.
_NO_DROPOUT_W2V = dict(
    hidden_dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
    feat_proj_dropout=0.0,
    layerdrop=0.0,
    apply_spec_augment=False,
    mask_time_prob=0.0,
    feat_extract_norm="layer",
    do_stable_layer_norm=True,
)
_NO_DROPOUT_BERT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

# Formatter off for this table (the skip at its end): one block per preset, the same keys in the same
# order, so presets read side by side.
ENCODER_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "image": dict(model_type="resnet", embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1],
                      layer_type="basic"),
        "audio": dict(model_type="wav2vec2", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, conv_dim=[32] * 7, num_conv_pos_embeddings=16,
                      num_conv_pos_embedding_groups=4, **_NO_DROPOUT_W2V),
        "text": dict(model_type="bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512, **_NO_DROPOUT_BERT),
    },
    "small": {
        "image": dict(model_type="resnet", embedding_size=32, hidden_sizes=[32, 64, 128, 256],
                      depths=[1, 1, 1, 1], layer_type="basic"),
        "audio": dict(model_type="wav2vec2", hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                      intermediate_size=256, conv_dim=[128] * 7, num_conv_pos_embeddings=32,
                      num_conv_pos_embedding_groups=8, **_NO_DROPOUT_W2V),
        "text": dict(model_type="bert", hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=256, max_position_embeddings=512, **_NO_DROPOUT_BERT),
    },
    # The real shapes: ResNet-152, Wav2Vec 2.0 base widths (stable layer norm), BERT base.
    "full": {
        "image": dict(model_type="resnet", embedding_size=64, hidden_sizes=[256, 512, 1024, 2048],
                      depths=[3, 8, 36, 3], layer_type="bottleneck"),
        "audio": dict(model_type="wav2vec2", **_NO_DROPOUT_W2V),
        "text": dict(model_type="bert", **_NO_DROPOUT_BERT),
    },
}  # fmt: skip

# Keys of a serialised transformers config that say where it came from, not what it is.
_PROVENANCE_KEYS = ("_name_or_path", "transformers_version", "architectures", "pretrained")


def resolve_encoder_entry(modality: str, spec: Any) -> dict[str, Any]:
    """One `encoder_configs` entry -> a self-contained config dict (a local folder's config is read now)."""
    if isinstance(spec, PreTrainedConfig):
        spec = spec.to_dict()
    if isinstance(spec, (str, os.PathLike)):
        spec = {"pretrained": os.fspath(spec)}
    if not isinstance(spec, dict):
        raise ValueError(
            f"encoder_configs[{modality!r}] is a {type(spec).__name__}; give a config dict with a "
            "'model_type', or a local pretrained folder path"
        )
    spec = copy.deepcopy(spec)
    folder = spec.get("pretrained")
    if folder and "model_type" not in spec:
        path = Path(folder).expanduser()
        if not (path / "config.json").is_file():
            raise ValueError(
                f"encoder_configs[{modality!r}]: {path} is not a local transformers model folder "
                "(no config.json); give a folder written by save_pretrained, or a config dict"
            )
        resolved = AutoConfig.from_pretrained(path).to_dict()
        resolved.update({k: v for k, v in spec.items() if k != "pretrained"})
        resolved["pretrained"] = str(path.resolve())
        spec = resolved
    if "model_type" not in spec:
        raise ValueError(
            f"encoder_configs[{modality!r}] has no 'model_type'; give e.g. "
            f"{{'model_type': {ENCODER_PRESETS['tiny'][modality]['model_type']!r}, ...}} or a local folder path"
        )
    return spec


def encoder_config(entry: dict[str, Any]) -> PreTrainedConfig:
    """The transformers config of one resolved `encoder_configs` entry."""
    fields = {k: v for k, v in entry.items() if k not in _PROVENANCE_KEYS}
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields)


def build_encoder(entry: dict[str, Any]) -> PreTrainedModel:
    """A randomly initialised transformers encoder (`AutoModel`) for one resolved entry."""
    config = encoder_config(entry)
    kwargs = {"add_pooling_layer": False} if config.model_type == "bert" else {}
    return AutoModel.from_config(config, **kwargs)


def load_pretrained_encoder(encoder: PreTrainedModel, folder: str) -> None:
    """Copy the weights of the local pretrained `folder` into `encoder` (same architecture)."""
    kwargs = {"add_pooling_layer": False} if encoder.config.model_type == "bert" else {}
    source = AutoModel.from_pretrained(folder, dtype=encoder.dtype, **kwargs)
    missing, unexpected = encoder.load_state_dict(source.state_dict(), strict=False)
    if missing:
        raise ValueError(
            f"pretrained encoder {folder} lacks weights {missing[:5]}; is it the same architecture?"
        )


def encoder_width(config: PreTrainedConfig) -> int:
    """Channels of the encoder's last hidden state."""
    hidden_sizes = getattr(config, "hidden_sizes", None)
    return int(hidden_sizes[-1]) if hidden_sizes else int(config.hidden_size)


def chunk_pool(
    hidden: torch.Tensor, mask: torch.Tensor, chunks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked mean (n, C) and `chunks` equal-length masked means (n, k, C) of a sequence (n, L, C).

    Valid position t of a row with `len` valid positions falls in chunk floor(rank(t) * k / len); a chunk
    that receives nothing (len < k) is marked invalid in the returned mask (n, k) instead of zero-filled.
    """
    mask = mask.to(torch.bool)
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # (n, L, 1)
    lengths = mask.sum(-1, keepdim=True).clamp(min=1)  # (n, 1)
    pooled = (hidden * weights).sum(1) / lengths.to(hidden.dtype)  # (n, C)
    rank = mask.long().cumsum(-1) - 1  # (n, L): index among valid positions
    bins = (rank * chunks).div(lengths, rounding_mode="floor").clamp(0, chunks - 1)
    bins = bins.masked_fill(~mask, 0)
    one_hot = F.one_hot(bins, chunks).to(hidden.dtype) * weights  # (n, L, k)
    sums = torch.einsum("nlk,nlc->nkc", one_hot, hidden)  # (n, k, C)
    counts = one_hot.sum(1)  # (n, k)
    tokens = sums / counts.clamp(min=1).unsqueeze(-1)
    return pooled, tokens, counts > 0


def image_features(
    encoder: PreTrainedModel, pixel_values: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pixel_values (n, 3, H, W) -> pooled (n, C), a grid of num_tokens tokens (n, k, C), mask (n, k)."""
    hidden = encoder(pixel_values=pixel_values).last_hidden_state
    if hidden.dim() == 4:  # convnets: (n, C, h, w)
        grid = math.isqrt(num_tokens)
        pooled = hidden.mean(dim=(2, 3))
        tokens = F.adaptive_avg_pool2d(hidden, grid).flatten(2).transpose(1, 2)  # (n, g*g, C)
        return pooled, tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)  # ViT-like: (n, N, C)
    return chunk_pool(hidden, mask, num_tokens)


def audio_features(
    encoder: PreTrainedModel, input_values: torch.Tensor, attention_mask: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Waveforms (n, S) at the feature extractor's rate + sample mask -> pooled, k time chunks, mask."""
    hidden = encoder(input_values=input_values, attention_mask=attention_mask).last_hidden_state  # (n, T', C)
    if hasattr(encoder, "_get_feature_vector_attention_mask"):
        frames = encoder._get_feature_vector_attention_mask(hidden.shape[1], attention_mask)  # (n, T')
    else:
        frames = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    return chunk_pool(hidden, frames, num_tokens)


def text_features(
    encoder: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids (n, L) + mask -> mean over real tokens, k chunks of tokens, mask."""
    hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (n, L, C)
    return chunk_pool(hidden, attention_mask, num_tokens)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
