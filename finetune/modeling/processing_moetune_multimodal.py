"""Processor of the multimodal model: image processor + audio feature extractor + tokenizer (+ the text
encoder's tokenizer), and the inputs `generate` takes from a prompt, an image and a sound. The model
is `modeling_moetune_multimodal.py`, its configuration `configuration_moetune_multimodal.py`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import ProcessorMixin

from .configuration_moetune_multimodal import MoetuneMultimodalConfig


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
        ids = tok(
            text,
            add_special_tokens=tok is not self.tokenizer,
            truncation=True,
            max_length=self.text_max_length,
        )["input_ids"]
        return list(ids)[: self.text_max_length] or [tok.pad_token_id or 0]

    def images_to_pixels(self, images: list) -> torch.Tensor:
        """PIL images / HWC uint8 arrays -> pixel_values (n, 3, H, W) float32."""
        return self.image_processor(images, return_tensors="pt")["pixel_values"]

    def audio_to_values(self, waveforms: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Mono float waveforms at `sampling_rate` -> input_values (n, S) and attention mask (n, S)."""
        out = self.feature_extractor(
            waveforms,
            sampling_rate=self.sampling_rate,
            padding=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
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
            size={"height": size, "width": size},
            image_mean=list(IMAGENET_DEFAULT_MEAN),
            image_std=list(IMAGENET_DEFAULT_STD),
        )
    if path := folder("audio", "preprocessor_config.json"):
        feature_extractor = AutoFeatureExtractor.from_pretrained(path)
        feature_extractor.return_attention_mask = True
    else:
        feature_extractor = Wav2Vec2FeatureExtractor(
            feature_size=1,
            sampling_rate=config.audio_sampling_rate,
            padding_value=0.0,
            do_normalize=True,
            return_attention_mask=True,
        )
    if text_encoder_tokenizer is None:
        path = folder("text", "tokenizer_config.json")
        text_encoder_tokenizer = AutoTokenizer.from_pretrained(path) if path else tokenizer
    return MoetuneMultimodalProcessor(
        image_processor,
        feature_extractor,
        tokenizer,
        text_encoder_tokenizer,
        modalities=config.modalities,
        text_max_length=config.text_max_length,
        label_names=config.mm_label_names,
    )


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


__all__ = ["MoetuneMultimodalProcessor", "build_processor", "prepare_multimodal_inputs"]
