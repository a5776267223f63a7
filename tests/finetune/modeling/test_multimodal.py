"""The multimodal model: encoders, projections, gated fusion, contrastive loss, prefix decoding, save / load."""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, ResNetConfig, ResNetModel

import finetune  # noqa: F401  (registers the Auto classes)
from finetune.data.synthetic_mm import synthetic_tokenizer
from finetune.modeling.multimodal import (
    MoetuneMultimodalConfig,
    MoetuneMultimodalForCausalLM,
    build_processor,
    describe_encoders,
    multimodal_config,
    prepare_multimodal_inputs,
    symmetric_info_nce,
)

ALL = ["image", "audio", "text"]


@contextlib.contextmanager
def quiet_peft():
    """PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing`; that FutureWarning is theirs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


@pytest.fixture(scope="module")
def tokenizer():
    return synthetic_tokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = multimodal_config("tiny", ALL, mm_label_names=["a", "b", "c"])
    return AutoModelForCausalLM.from_config(config).eval()


def batch(size: int = 4, seed: int = 0, image=None, audio=None, text=None) -> dict[str, torch.Tensor]:
    """A random batch with every modality; `image` / `audio` / `text` give the (B,) presence masks."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 400, (size, 6), generator=g)
    out = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids.clone(),
        "pixel_values": torch.randn(size, 3, 64, 64, generator=g),
        "input_values": torch.randn(size, 4000, generator=g),
        "audio_attention_mask": torch.ones(size, 4000, dtype=torch.long),
        "text_input_ids": torch.randint(3, 400, (size, 5), generator=g),
        "text_attention_mask": torch.ones(size, 5, dtype=torch.long),
        "mm_labels": (torch.rand(size, 3, generator=g) > 0.5).float(),
    }
    for key, mask in (("image_mask", image), ("audio_mask", audio), ("text_mask", text)):
        if mask is not None:
            out[key] = torch.tensor(mask, dtype=torch.bool)
    return out


def test_config_resolves_encoders_and_round_trips(tmp_path):
    config = multimodal_config("tiny", "image,audio,text", num_labels_mm=2)
    assert config.model_type == "moetune_multimodal"
    assert [config.encoder_configs[m]["model_type"] for m in ALL] == ["resnet", "wav2vec2", "bert"]
    assert config.encoder_configs["text"]["vocab_size"] == config.vocab_size  # shares the decoder tokenizer
    assert config.fusion_dim == 512
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, MoetuneMultimodalConfig)
    assert loaded.encoder_configs == config.encoder_configs and loaded.modalities == ALL

    full = multimodal_config("full", ["image"])  # the ResNet-152 shape
    assert full.encoder_configs["image"]["depths"] == [3, 8, 36, 3]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"modalities": ["video"]}, "not one of"),
        ({"modalities": ["image"], "prefix_tokens": {"image": 3}}, "must be a square"),
        ({"modalities": ["image"], "contrastive_pairs": [["image", "text"]]}, "two different configured"),
        ({"modalities": ["image", "image"]}, "repeat"),
    ],
)
def test_config_refuses_bad_settings(kwargs, message):
    modalities = kwargs.pop("modalities")
    with pytest.raises(ValueError, match=message):
        multimodal_config("tiny", modalities, **kwargs)


def test_forward_reports_each_loss_and_their_weighted_sum(model):
    model.train()
    try:
        inputs = batch(image=[1, 1, 1, 0], audio=[1, 0, 1, 1], text=[0, 1, 1, 1])
        inputs["mm_label_mask"] = torch.tensor([True, True, False, True])
        out = model(**inputs)
    finally:
        model.eval()
    parts = (out.lm_loss, out.aux_loss, out.contrastive_loss, out.classification_loss)
    assert all(p is not None and torch.isfinite(p) for p in parts)
    c = model.config
    expected = (
        out.lm_loss
        + c.router_aux_loss_coef * out.aux_loss
        + c.contrastive_loss_coef * out.contrastive_loss
        + c.classification_loss_coef * out.classification_loss
    )
    torch.testing.assert_close(out.loss, expected)
    assert out.logits.shape[:2] == (4, out.prefix_length + 6)
    assert out.prefix_length == 1 + sum(c.prefix_tokens[m] for m in ALL)
    model.zero_grad()
    out.loss.backward()
    for name in ("projectors.image.linear_1.weight", "fusion_gate.score.weight", "contrastive.logit_scale",
                 "prefix_projector.weight", "classifier.weight", "encoders.text.embeddings.word_embeddings.weight"):  # fmt: skip
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    model.zero_grad()


def test_absent_modality_is_masked_not_zero_filled(model):
    """An example without an image gives exactly what the same example gives with no image input at all,
    whatever garbage (even NaN) sits in its placeholder row; zero-filling would not."""
    inputs = batch(size=2, image=[1, 0], audio=[1, 1], text=[1, 1])
    inputs["pixel_values"][1] = float("nan")
    with torch.no_grad():
        out = model(**inputs)
        alone = {k: v[1:] for k, v in inputs.items() if k not in ("pixel_values", "image_mask")}
        reference = model(**alone)
        zero_filled = model(**{**{k: v[1:] for k, v in inputs.items()}, "pixel_values": torch.zeros(1, 3, 64, 64),
                               "image_mask": torch.tensor([True])})  # fmt: skip
    assert torch.isfinite(out.logits).all()
    assert out.gate_weights[1, 0] == 0 and torch.isclose(out.gate_weights[1].sum(), torch.tensor(1.0))
    p_with, p_alone = out.prefix_length, reference.prefix_length
    torch.testing.assert_close(out.logits[1, p_with:], reference.logits[0, p_alone:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.fused_embeds[1], reference.fused_embeds[0], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(zero_filled.logits[0, -6:], reference.logits[0, -6:], atol=1e-4)


def test_gate_weights_depend_on_which_modalities_are_present():
    from finetune.modeling.multimodal import MoetuneFusionGate

    torch.manual_seed(0)
    embeds = torch.randn(1, 3, 512)
    learned = MoetuneFusionGate(3, 512, floor=0.0)
    with torch.no_grad():
        learned.presence.weight.normal_(0, 1.0)
        _, w_all = learned(embeds, torch.tensor([[True, True, True]]))
        _, w_some = learned(embeds, torch.tensor([[True, True, False]]))
    assert w_some[0, 2] == 0 and torch.isclose(w_some.sum(), torch.tensor(1.0))
    # Renormalising the same scores would keep this ratio; the presence term changes it.
    assert not torch.isclose(w_all[0, 0] / w_all[0, 1], w_some[0, 0] / w_some[0, 1], rtol=1e-3)

    floored = MoetuneFusionGate(3, 512, floor=0.5)
    with torch.no_grad():
        floored.score.weight.normal_(0, 10.0)  # a gate that would put all weight on one modality
        fused, weights = floored(embeds, torch.tensor([[True, True, False]]))
    assert weights[0, 2] == 0 and (weights[0, :2] >= 0.25 - 1e-6).all()
    torch.testing.assert_close(fused[0], weights[0, 0] * embeds[0, 0] + weights[0, 1] * embeds[0, 1])


def test_contrastive_loss_is_symmetric_infonce_with_learnable_temperature(model):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 512, generator=g), torch.randn(6, 512, generator=g)
    loss, scale = model.contrastive(a, b)
    swapped, _ = model.contrastive(b, a)
    torch.testing.assert_close(loss, swapped)
    torch.testing.assert_close(scale, torch.tensor(1 / 0.07), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, symmetric_info_nce(a, b, model.contrastive.logit_scale.detach()))
    # reference: mean of the row-wise and column-wise cross-entropy of the scaled cosine matrix
    logits = (
        (1 / 0.07) * torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T
    )
    manual = sum(-torch.log_softmax(m, dim=-1).diagonal().mean() for m in (logits, logits.T)) / 2
    torch.testing.assert_close(loss, manual, rtol=1e-4, atol=1e-5)
    aligned, _ = model.contrastive(a, a + 0.01 * b)
    assert aligned < loss
    model.zero_grad()
    loss.backward()
    assert model.contrastive.logit_scale.grad is not None and model.contrastive.logit_scale.grad != 0
    model.zero_grad()


def test_contrastive_pairs_need_two_examples_with_both(model):
    with torch.no_grad():
        out = model(**batch(image=[1, 0, 0, 0], audio=[0, 1, 0, 0], text=[0, 0, 1, 1]))
    assert out.contrastive_loss is None  # no pair has two rows with both modalities


def test_alignment_and_classification_run_without_the_decoder(model):
    inputs = {k: v for k, v in batch().items() if k not in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits is None and out.lm_loss is None
    c = model.config
    expected = (
        c.contrastive_loss_coef * out.contrastive_loss + c.classification_loss_coef * out.classification_loss
    )
    torch.testing.assert_close(out.loss, expected)


def test_frozen_batchnorm_statistics_do_not_drift_in_training(model):
    bn = next(m for m in model.encoders["image"].modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    model.train()
    try:
        assert not bn.training
        with torch.no_grad():
            model(**batch(size=2))
    finally:
        model.eval()
    torch.testing.assert_close(bn.running_mean, before)


def test_save_load_and_generate_with_a_prefix(model, tokenizer, tmp_path):
    processor = build_processor(model.config, tokenizer)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    proc = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is MoetuneMultimodalForCausalLM
    assert proc.modalities == ALL and proc.label_names == ["a", "b", "c"] and proc.sampling_rate == 16000
    inputs = batch(size=2, image=[1, 0], audio=[1, 1], text=[0, 1])
    with torch.no_grad():
        a, b = model(**inputs), loaded(**inputs)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.classification_logits, b.classification_logits)

    # greedy generation with the KV cache == a greedy loop of full forwards without cache
    media = {
        k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "labels", "mm_labels")
    }
    prompt = inputs["input_ids"][:, :2]
    generated = loaded.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5,
                                do_sample=False, **media)  # fmt: skip
    ids = prompt
    with torch.no_grad():
        for _ in range(5):
            logits = loaded(input_ids=ids, use_cache=False, **media).logits
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, ids)


def test_pretrained_encoder_folder_is_loaded_when_built_from_config(tmp_path, tokenizer):
    torch.manual_seed(5)
    encoder = ResNetModel(
        ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    )
    encoder.save_pretrained(tmp_path / "resnet")
    config = multimodal_config("tiny", ["image"], encoder_configs={"image": str(tmp_path / "resnet")})
    assert config.encoder_configs["image"]["hidden_sizes"] == [8, 16]
    model = AutoModelForCausalLM.from_config(config)
    torch.testing.assert_close(
        model.encoders["image"].embedder.embedder.convolution.weight,
        encoder.embedder.embedder.convolution.weight,
    )
    rows = describe_encoders(model)
    assert (
        rows[0]["source"].endswith("resnet") and rows[0]["model_type"] == "resnet" and rows[0]["params"] > 0
    )
    with pytest.raises(ValueError, match="no config.json"):
        multimodal_config("tiny", ["image"], encoder_configs={"image": str(tmp_path / "missing")})


def test_prepare_multimodal_inputs_from_files(tmp_path, tokenizer, model):
    import numpy as np
    import soundfile as sf
    from PIL import Image

    processor = build_processor(model.config, tokenizer)
    Image.fromarray(np.full((40, 30, 3), 200, dtype=np.uint8)).save(tmp_path / "x.png")
    sf.write(tmp_path / "x.wav", np.zeros((8000, 2), dtype=np.float32), 8000)  # stereo, 8 kHz
    inputs = prepare_multimodal_inputs(
        processor, "a story", image=tmp_path / "x.png", audio=tmp_path / "x.wav"
    )
    assert inputs["pixel_values"].shape == (1, 3, 64, 64)
    assert inputs["input_values"].shape == (1, 16000)  # resampled to the encoder's 16 kHz
    assert inputs["input_ids"][0, 0] == tokenizer.bos_token_id and "text_input_ids" in inputs
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 3)

    image_only = build_processor(multimodal_config("tiny", ["image"]), tokenizer)
    with pytest.raises(ValueError, match="no audio encoder"):
        prepare_multimodal_inputs(image_only, "", audio=tmp_path / "x.wav")


def test_lora_on_encoders_and_projectors_with_plain_peft(model, tmp_path):
    """The module names adapters target: encoders.<modality>.* linears, the glue as modules_to_save."""
    from peft import LoraConfig, PeftModel, get_peft_model

    def fresh():
        torch.manual_seed(7)
        return AutoModelForCausalLM.from_config(model.config).eval()

    base = fresh()
    encoder_linears = [
        n for n, m in base.named_modules() if n.startswith("encoders.") and isinstance(m, torch.nn.Linear)
    ]
    assert {n.split(".")[1] for n in encoder_linears} == {"audio", "text"}  # the ResNet has only convolutions
    glue = ["projectors.image", "projectors.audio", "projectors.text", "prefix_projector", "fusion_gate",
            "contrastive", "classifier"]  # fmt: skip
    config = LoraConfig(r=4, lora_alpha=8, target_modules=encoder_linears + ["q_proj", "v_proj"],
                        modules_to_save=glue, init_lora_weights=False)  # fmt: skip
    with quiet_peft():
        peft_model = get_peft_model(base, config)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert any(".encoders.audio." in n and "lora_A" in n for n in trainable)
    assert any(".contrastive.modules_to_save" in n for n in trainable)
    inputs = batch(size=2, image=[1, 1], audio=[1, 0], text=[1, 1])
    out = peft_model(**inputs)
    out.loss.backward()
    peft_model.save_pretrained(tmp_path)
    with quiet_peft():
        reloaded = PeftModel.from_pretrained(fresh(), tmp_path).eval()
    peft_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**inputs).logits, reloaded(**inputs).logits)


def test_chunk_pool_ignores_padding():
    from finetune.modeling.encoders import chunk_pool

    hidden = torch.arange(12, dtype=torch.float).reshape(1, 6, 2).repeat(2, 1, 1)  # (2, 6, 2)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    pooled, tokens, valid = chunk_pool(hidden, mask, 2)
    torch.testing.assert_close(pooled[0], hidden[0, :4].mean(0))
    torch.testing.assert_close(tokens[0], torch.stack([hidden[0, :2].mean(0), hidden[0, 2:4].mean(0)]))
    torch.testing.assert_close(tokens[1], torch.stack([hidden[1, :3].mean(0), hidden[1, 3:].mean(0)]))
    _, _, few = chunk_pool(hidden[:1, :1], mask[:1, :1], 2)  # one valid position, two chunks
    assert few.tolist() == [[True, False]]
    assert math.isclose(float(valid.float().mean()), 1.0)
