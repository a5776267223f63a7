"""The multimodal model's configuration / modeling / processing modules: old import paths, saved
folders and pickles keep working (what a folder records names no module, only model_type and classes)."""

from __future__ import annotations

import json
import pickle

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor

import finetune  # noqa: F401  (registers the Auto classes)
from finetune.data.synthetic_mm import synthetic_tokenizer
from finetune.modeling import (
    MoetuneMultimodalConfig,
    MoetuneMultimodalForCausalLM,
    MoetuneMultimodalProcessor,
    configuration_moetune_multimodal,
    modeling_moetune_multimodal,
    multimodal,
    processing_moetune_multimodal,
)

OLD_MODULE = b"finetune.modeling.multimodal"


def test_the_old_import_path_names_the_same_classes():
    assert multimodal.MoetuneMultimodalConfig is configuration_moetune_multimodal.MoetuneMultimodalConfig
    assert multimodal.MoetuneMultimodalForCausalLM is modeling_moetune_multimodal.MoetuneMultimodalForCausalLM
    assert multimodal.MoetuneMultimodalProcessor is processing_moetune_multimodal.MoetuneMultimodalProcessor
    assert multimodal.build_processor is processing_moetune_multimodal.build_processor
    assert (MoetuneMultimodalConfig, MoetuneMultimodalForCausalLM, MoetuneMultimodalProcessor) == (
        multimodal.MoetuneMultimodalConfig,
        multimodal.MoetuneMultimodalForCausalLM,
        multimodal.MoetuneMultimodalProcessor,
    )


def test_a_pickle_naming_the_old_module_still_loads():
    config = multimodal.multimodal_config("tiny", ["image"])
    new_module = MoetuneMultimodalConfig.__module__.encode()
    data = pickle.dumps(config, protocol=2)  # protocol 2 spells module and class out in the stream
    assert new_module in data
    old = pickle.loads(data.replace(new_module, OLD_MODULE))  # what a pickle from before the split holds
    assert isinstance(old, MoetuneMultimodalConfig) and old.modalities == ["image"]


def test_a_saved_folder_records_no_module_and_loads_through_the_auto_classes(tmp_path):
    torch.manual_seed(0)
    config = multimodal.multimodal_config("tiny", ["image", "text"])
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path)
    multimodal.build_processor(config, synthetic_tokenizer()).save_pretrained(tmp_path)
    for name in ("config.json", "processor_config.json"):
        text = (tmp_path / name).read_text()
        assert "auto_map" not in json.loads(text) and "finetune" not in text  # only model_type / class names
    assert AutoConfig.from_pretrained(tmp_path).model_type == "moetune_multimodal"
    assert isinstance(AutoProcessor.from_pretrained(tmp_path), MoetuneMultimodalProcessor)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(3, 100, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
