"""`moetune generate`: prompt layout (chat template / raw / the adapter's training layout), sampling
with a seed, whole-character decoding, and the multimodal cases."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from adapters import apply_lora
from adapters.errors import MoetuneError
from adapters.merge import merge_into_base
from finetune.generation import REPLACEMENT, decode_new_text, generate_text, prompt_inputs
from finetune.loading import init_model, load_model


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gen") / "base"
    init_model("tiny", folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def tokenizer(base):
    return load_model(str(base))[1]


def _adapter_with_recipe(folder: Path, data: dict) -> str:
    folder.mkdir(parents=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump({"data": data}))
    return str(folder)


def _ids(inputs) -> list[int]:
    return inputs["input_ids"][0].tolist()


def test_the_chat_template_is_the_default_when_the_tokenizer_has_one(tokenizer):
    assert tokenizer.chat_template
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert _ids(prompt_inputs(tokenizer, "hi")) == list(chat)
    assert _ids(prompt_inputs(tokenizer, "hi", chat=True)) == list(chat)
    assert _ids(prompt_inputs(tokenizer, "hi", chat=False)) == tokenizer("hi")["input_ids"]


def test_the_default_follows_the_adapters_training_layout(tokenizer, tmp_path):
    text = _adapter_with_recipe(tmp_path / "text", {"format": "text"})
    assert _ids(prompt_inputs(tokenizer, "def ", adapter=text)) == tokenizer("def ")["input_ids"]
    instruct = _adapter_with_recipe(tmp_path / "instruct", {"format": "instruction", "separator": " =>"})
    assert _ids(prompt_inputs(tokenizer, "2+2", adapter=instruct)) == tokenizer("2+2 =>")["input_ids"]
    assert (
        _ids(prompt_inputs(tokenizer, "2+2", adapter=instruct, chat=False)) == tokenizer("2+2")["input_ids"]
    )
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}[assistant] "
    chat = _adapter_with_recipe(tmp_path / "chat", {"format": "chat", "chat_template": template})
    assert (
        _ids(prompt_inputs(tokenizer, "hi", adapter=chat)) == tokenizer("[user] hi[assistant] ")["input_ids"]
    )


def test_chat_without_a_template_is_refused(tokenizer):
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        assert _ids(prompt_inputs(tokenizer, "hi")) == tokenizer("hi")["input_ids"]  # default: raw
        with pytest.raises(MoetuneError, match="no chat template; pass --raw"):
            prompt_inputs(tokenizer, "hi", chat=True)
    finally:
        tokenizer.chat_template = template


def test_sampling_is_repeatable_with_a_seed_and_leaves_the_callers_rng_alone(base):
    state = torch.get_rng_state()
    one = generate_text(str(base), "def ", max_new_tokens=8, temperature=1.0, top_p=0.9, seed=1, chat=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert one == generate_text(
        str(base), "def ", max_new_tokens=8, temperature=1.0, top_p=0.9, seed=1, chat=False
    )
    assert one != generate_text(
        str(base), "def ", max_new_tokens=8, temperature=1.0, top_p=0.9, seed=2, chat=False
    )
    greedy = generate_text(str(base), "def ", max_new_tokens=8, chat=False)
    assert greedy == generate_text(str(base), "def ", max_new_tokens=8, chat=False, seed=5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"top_p": 0.5}, "--top-p applies to sampling only"),
        ({"temperature": -1.0}, "--temperature must be >= 0"),
        ({"temperature": 1.0, "top_p": 0.0}, r"--top-p must be in \(0, 1\]"),
    ],
)
def test_bad_sampling_settings_are_refused(base, kwargs, message):
    with pytest.raises(MoetuneError, match=message):
        generate_text(str(base), "x", **kwargs)


def test_a_character_cut_by_the_token_budget_is_dropped_not_broken(tokenizer):
    ids = tokenizer("ab \u2603\u2603", add_special_tokens=False)["input_ids"]  # snowmen: 3 bytes each
    cuts = [k for k in range(1, len(ids)) if tokenizer.decode(ids[:k]).endswith(REPLACEMENT)]
    assert cuts, "the snowman is one token in this vocabulary; the test needs a split character"
    prompt = tokenizer("x", add_special_tokens=False)["input_ids"]
    for k in cuts:
        text = decode_new_text(tokenizer, prompt + ids[:k], len(prompt))
        assert REPLACEMENT not in text and "ab \u2603\u2603".startswith(text)
    assert decode_new_text(tokenizer, prompt + ids, len(prompt)) == "ab \u2603\u2603"
    # a character begun by the prompt's last token and finished by the first new one comes out whole
    for k in cuts:
        assert decode_new_text(tokenizer, ids, k) in ("\u2603", "\u2603\u2603")


def test_generated_text_is_valid_utf8_without_a_broken_tail(base):
    text = generate_text(str(base), "caf\u00e9 ", max_new_tokens=24, chat=False)
    assert not text.endswith(REPLACEMENT)
    text.encode("utf-8")  # raises on lone surrogates


@pytest.fixture(scope="module")
def mm_adapter(tmp_path_factory) -> tuple[Path, Path]:
    """A multimodal base folder and an adapter on its image encoder + projector (saved, not trained)."""
    root = tmp_path_factory.mktemp("mm")
    init_model("tiny", root / "base", modalities=["image"], seed=0)
    model, _ = load_model(str(root / "base"))
    peft_model = apply_lora(
        model, targets=["attention", "encoders", "projector"], r=4, init_lora_weights="gaussian"
    )
    peft_model.save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


def test_a_multimodal_adapter_on_a_text_only_base_names_the_fix(base, mm_adapter):
    with pytest.raises(
        MoetuneError, match="is a multimodal adapter .* text-only model; use the multimodal base"
    ) as err:
        generate_text(str(base), "a", adapter=str(mm_adapter[1]))
    assert "--modalities image" in str(err.value) and "\n" not in str(err.value)


def test_a_merged_multimodal_model_loads_without_the_tokenizer_fallback_warning(mm_adapter, tmp_path):
    mm_base, adapter = mm_adapter
    merge_into_base(mm_base, adapter, tmp_path / "merged")
    assert (tmp_path / "merged" / "text_encoder_tokenizer" / "tokenizer_config.json").is_file()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            text = generate_text(str(tmp_path / "merged"), "a", max_new_tokens=3)
    finally:
        transformers_logger.removeHandler(handler)
    assert isinstance(text, str)
    assert not [r for r in records if "Could not load tokenizer from subfolder" in r.getMessage()]


def test_chat_is_refused_for_multimodal_models_and_media_for_text_models(base, mm_adapter):
    with pytest.raises(MoetuneError, match="--chat: multimodal models are prompted in their training layout"):
        generate_text(str(mm_adapter[0]), "a", chat=True)
    with pytest.raises(MoetuneError, match="text-only model; use a multimodal model folder"):
        generate_text(str(base), "a", image="x.png")
