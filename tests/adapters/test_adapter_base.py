"""Adapters record their base (preset spec, hub id, absolute folder) and a base that does not match is
refused in one line naming both; a moved copy of the same base is only warned about."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapters import apply_lora, load_adapter
from adapters.errors import MoetuneError
from adapters.merge import merge_into_base, verify_merge
from finetune.generation import generate_text
from finetune.loading import load_model
from finetune.modeling import preset_config
from finetune.tokenizer import build_tokenizer


def _save_base(folder: Path, **overrides) -> Path:
    config = preset_config("tiny", **overrides)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    build_tokenizer(config.vocab_size).save_pretrained(folder)
    return folder


def _save_adapter(base_spec: str, folder: Path) -> Path:
    model, _ = load_model(base_spec)
    peft_model = apply_lora(model, targets=["attention", "experts"], r=4, init_lora_weights="gaussian")
    peft_model.save_pretrained(folder)
    return folder


def _recorded(adapter: Path) -> str:
    return json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]


@pytest.fixture
def trained(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A base folder given by a relative path, and an adapter saved on it."""
    monkeypatch.chdir(tmp_path)
    base = _save_base(tmp_path / "base")
    return base, _save_adapter("base", tmp_path / "adapter")


@pytest.mark.filterwarnings("ignore:Could not find a config file in preset:UserWarning")  # PEFT asks the Hub
def test_the_adapter_records_the_folder_as_an_absolute_path_and_a_preset_by_its_spec(trained, tmp_path):
    base, adapter = trained
    assert _recorded(adapter) == str(base.resolve())
    assert _recorded(_save_adapter("preset:tiny", tmp_path / "preset-adapter")) == "preset:tiny"


def test_a_moved_copy_of_the_base_is_warned_about_and_used(trained, tmp_path, caplog):
    base, adapter = trained
    shutil.copytree(base, tmp_path / "elsewhere")
    with caplog.at_level(logging.WARNING, logger="moetune"):
        model = load_adapter(load_model(str(tmp_path / "elsewhere"))[0], adapter)
    (line,) = [r.getMessage() for r in caplog.records if "was trained on" in r.getMessage()]
    assert str(base.resolve()) in line and str(tmp_path / "elsewhere") in line
    reference = load_adapter(load_model(str(base))[0], adapter)
    ids = torch.randint(0, 1024, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_the_same_base_by_a_relative_path_is_silent(trained, caplog):
    _, adapter = trained
    with caplog.at_level(logging.WARNING, logger="moetune"):
        load_adapter(load_model("base")[0], adapter, base="base")
    assert not [r for r in caplog.records if "was trained on" in r.getMessage()]


def test_a_base_with_another_architecture_is_refused_everywhere_naming_both(trained, tmp_path):
    base, adapter = trained
    other = _save_base(tmp_path / "top3", num_experts_per_tok=3)  # same shapes, other routing
    expected = rf"{adapter} was trained on {base.resolve()}, whose config differs from .*top3 \(num_experts_per_tok 2 vs 3\)"
    with pytest.raises(MoetuneError, match=expected):
        load_adapter(load_model(str(other))[0], adapter)
    with pytest.raises(MoetuneError, match=expected):
        generate_text(str(other), "x", adapter=str(adapter))
    with pytest.raises(MoetuneError, match=expected):
        merge_into_base(other, adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    merge_into_base(base, adapter, tmp_path / "merged-ok")
    with pytest.raises(MoetuneError, match=expected):
        verify_merge(other, adapter, tmp_path / "merged-ok")


def test_a_shape_mismatch_names_the_recorded_base_even_when_it_is_gone(trained, tmp_path):
    base, adapter = trained
    wide = _save_base(tmp_path / "wide", hidden_size=96, head_dim=24)
    shutil.rmtree(base)  # nothing left to compare configs with: the loader's shape check speaks
    with pytest.raises(
        MoetuneError, match=rf"adapter trained on {base.resolve()} does not fit .*wide"
    ) as err:
        load_adapter(load_model(str(wide))[0], adapter)
    assert f"pass {base.resolve()} as MODEL" in str(err.value) and "\n" not in str(err.value)
