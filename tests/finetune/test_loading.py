"""MODEL specs: presets, local folders of every family, hub ids offline, unsafe weights."""

from __future__ import annotations

import time

import pytest
import torch

from finetune import MoetuneError, load_model
from finetune.loading import init_model, resolve_model_folder
from tests.helpers.models import FAMILIES, build, random_batch, save


def test_preset_tiny_loads_with_a_working_tokenizer():
    model, tokenizer = load_model("preset:tiny")
    assert model.config.model_type == "moetune"
    ids = tokenizer("def main():\n    return 0", return_tensors="pt")["input_ids"]
    assert tokenizer.decode(ids[0]) == "def main():\n    return 0"
    assert int(ids.max()) < model.config.vocab_size
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("family", FAMILIES)
def test_local_folder_of_every_family_loads_as_saved(tmp_path, family):
    reference = build(family)
    save(family, tmp_path)
    model, tokenizer = load_model(str(tmp_path))
    assert model.config.model_type == reference.config.model_type
    assert tokenizer is None  # these folders carry no tokenizer files
    batch = random_batch()
    torch.testing.assert_close(model(**batch).logits, reference(**batch).logits)


def test_dtype_option(tmp_path):
    save("qwen3_moe", tmp_path)
    model, _ = load_model(str(tmp_path), dtype="bfloat16")
    assert model.dtype == torch.bfloat16


def test_init_model_writes_a_loadable_checkpoint(tmp_path):
    out = init_model("tiny", tmp_path / "m", seed=3).folder
    model, tokenizer = load_model(str(out))
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert tokenizer.pad_token_id == model.config.pad_token_id == 0
    again = init_model("tiny", tmp_path / "m2", seed=3).folder
    torch.testing.assert_close(
        load_model(str(again))[0].lm_head.weight, model.lm_head.weight, rtol=0, atol=0
    )  # the seed makes init reproducible


def test_init_model_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(MoetuneError, match="not empty"):
        init_model("tiny", tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("preset:huge", "unknown preset 'huge'"),
        ("/nonexistent/model/folder", "does not exist"),
    ],
)
def test_bad_specs_fail_with_one_line(spec, message):
    with pytest.raises(MoetuneError, match=message) as err:
        load_model(spec)
    assert "\n" not in str(err.value)


def test_folder_without_config_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(MoetuneError, match="not a model folder"):
        load_model(str(tmp_path))


def test_pickle_weights_are_refused_unless_allowed(tmp_path):
    model = build("mixtral")
    model.save_pretrained(tmp_path, safe_serialization=False) if _supports_pickle_save() else None
    if not (tmp_path / "pytorch_model.bin").exists():
        model.config.save_pretrained(tmp_path)
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(MoetuneError, match="pickle"):
        load_model(str(tmp_path))
    loaded, _ = load_model(str(tmp_path), allow_pickle=True)
    assert loaded.config.model_type == "mixtral"


def _supports_pickle_save() -> bool:
    import inspect

    from transformers import PreTrainedModel

    return "safe_serialization" in inspect.signature(PreTrainedModel.save_pretrained).parameters


def test_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(MoetuneError, match="cannot reach the Hugging Face Hub"):
        load_model("some-org/some-moe-model")
    assert time.monotonic() - start < 30  # a bound against hangs, not a speed claim


def test_hub_id_with_unreachable_endpoint_fails_fast(monkeypatch):
    import socket

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with socket.socket() as held:  # bound, never listening: connections are refused, and no one else has it
        held.bind(("127.0.0.1", 0))
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{held.getsockname()[1]}")
        with pytest.raises(MoetuneError, match="cannot reach"):
            resolve_model_folder("some-org/some-moe-model")


def test_preset_has_no_folder_for_merging():
    with pytest.raises(MoetuneError, match="init-model"):
        resolve_model_folder("preset:tiny")


def test_full_preset_is_never_materialised_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("GPU machines may materialise the full preset")
    with pytest.raises(MoetuneError, match="too large"):
        load_model("preset:full")


def test_remote_code_never_runs_unless_asked(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"model_type": "my_custom_moe", "architectures": ["CustomModel"], "auto_map": '
        '{"AutoConfig": "configuration_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomModel"}}'
    )
    marker = tmp_path / "ran.txt"
    code = f"open({str(marker)!r}, 'w').write('remote code ran')\n"
    (tmp_path / "configuration_custom.py").write_text(code)
    (tmp_path / "modeling_custom.py").write_text(code)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(MoetuneError, match="--trust-remote-code"):
        load_model(str(tmp_path))
    assert not marker.exists()


def test_preset_with_modalities_builds_the_multimodal_model_and_processor():
    model, processor = load_model("preset:tiny", modalities=["image", "text"])
    assert model.config.model_type == "moetune_multimodal"
    assert sorted(model.config.modalities) == ["image", "text"]
    assert hasattr(processor, "tokenizer")


def test_saved_folder_refuses_other_modalities(tmp_path):
    init_model("tiny", tmp_path / "m")
    with pytest.raises(MoetuneError, match="modalities"):
        load_model(str(tmp_path / "m"), modalities=["image"])


def test_init_model_that_fails_half_way_leaves_no_folder(tmp_path, monkeypatch):
    """The weights are written, then the tokenizer fails: neither OUTPUT nor a temporary folder remains."""
    from transformers import PreTrainedTokenizerFast

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        init_model("tiny", tmp_path / "m")
    assert list(tmp_path.iterdir()) == []
