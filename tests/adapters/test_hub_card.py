"""Model cards: the metadata the Hub indexes, the body a reader needs, and no secret anywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from peft import LoraConfig, get_peft_model

from adapters.combine import combine_adapters
from adapters.errors import MoetuneError
from adapters.hub import push_folder
from adapters.merge import merge_into_base
from adapters.model_card import read_card_metadata, split_front_matter, validate_model_card, write_model_card
from tests.helpers import models as tiny_models

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
TOKEN = "hf_cardTestTokenDoNotLeak0123456789"


def metadata(folder: Path) -> dict:
    front, _ = split_front_matter((folder / "README.md").read_text())
    return yaml.safe_load(front)


def body(folder: Path) -> str:
    return split_front_matter((folder / "README.md").read_text())[1]


def test_adapter_card_metadata_and_body(tmp_path):
    folder = tmp_path / "run" / "adapter"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    plot = tmp_path / "run" / "plots" / "expert_load.png"
    plot.parent.mkdir()
    plot.write_bytes(b"\x89PNG fake")
    metrics = {
        "eval_loss_after": 1.5,
        "perplexity_after": 4.48,
        "steps": 20,
        "tokens": None,
        "mixed_precision": "no",
    }
    path = write_model_card(
        folder,
        base_model="Qwen/Qwen3-30B-A3B",
        datasets=["org/domain-data", str(tmp_path / "local.jsonl")],
        metrics=metrics,
        recipe={"model": {"name": "Qwen/Qwen3-30B-A3B"}, "train": {"lr": 2e-4}, "output": {"hub_token": "x"}},
        images=[plot],
        license="apache-2.0",
    )
    assert path == folder / "README.md"
    meta = metadata(folder)
    assert meta["base_model"] == "Qwen/Qwen3-30B-A3B" and meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "peft" and meta["license"] == "apache-2.0"
    assert {"moe", "lora", "peft"} <= set(meta["tags"])
    assert meta["datasets"] == ["org/domain-data"]  # the local file is not a Hub id
    assert meta["metrics"] == ["eval_loss_after", "perplexity_after"]  # results only, not bookkeeping
    results = meta["model-index"][0]["results"][0]["metrics"]
    assert {m["type"]: m["value"] for m in results} == {"eval_loss_after": 1.5, "perplexity_after": 4.48}

    text = body(folder)
    assert 'PeftModel.from_pretrained(base, "path/to/this/folder")' in text
    assert 'AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-30B-A3B"' in text
    assert "`local: local.jsonl`" in text and str(tmp_path) not in text  # no local paths
    assert "| steps | 20 |" in text and "| eval_loss_after | 1.5 |" in text
    assert "hub_token: <redacted>" in text and "lr: 0.0002" in text
    assert "![expert load](images/expert_load.png)" in text and "share of routed tokens" in text
    assert (folder / "images" / "expert_load.png").read_bytes() == plot.read_bytes()
    assert validate_model_card(folder) == []
    ModelCard.load(path)  # huggingface_hub parses it, model-index included


def test_defaults_read_the_folder_and_local_bases_stay_out_of_metadata(tmp_path):
    base = tmp_path / "my-base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\n---\n# base\n")
    (base / "config.json").write_text(json.dumps({"model_type": "moetune"}))
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({"eval": {"loss": 2.0}, "train_loss": 2.5}))
    (folder / "recipe.yaml").write_text("model:\n  name: my-base\ntrain:\n  steps: 3\n")
    (folder / "plots").mkdir()
    (folder / "plots" / "expert_load.png").write_bytes(b"png")
    write_model_card(folder, base_model=str(base))

    meta = metadata(folder)
    assert "base_model" not in meta and meta["license"] == "mit"  # the base card's license
    assert meta["metrics"] == ["train_loss"]
    text = body(folder)
    assert (
        "`my-base` (not on the Hub, so the metadata names no base_model)" in text
        and str(tmp_path) not in text
    )
    assert "import finetune" in text  # the built-in architecture needs registering
    assert "| eval/loss | 2 |" in text and "steps: 3" in text
    assert "![expert load](plots/expert_load.png)" in text
    (warning,) = validate_model_card(folder)
    assert "names no base_model" in warning and "--base-model ORG/NAME" in warning


def test_merged_card(tmp_path):
    folder = tmp_path / ".tmp-merged"  # callers write into a temporary folder and rename it
    folder.mkdir()
    write_model_card(
        folder, base_model="org/base", kind="merged", details="## Merge details\n\nrounding: none"
    )
    meta = metadata(folder)
    assert meta["library_name"] == "transformers" and meta["base_model_relation"] == "finetune"
    assert {"moe", "lora", "merged-lora"} <= set(meta["tags"])
    text = body(folder)
    assert text.startswith("\n# merged\n")  # the title, without the temporary-folder marker
    assert 'AutoModelForCausalLM.from_pretrained("path/to/this/folder"' in text and "PeftModel" not in text
    assert text.rstrip().endswith("rounding: none")


def test_bad_card_arguments(tmp_path):
    with pytest.raises(MoetuneError, match="kind must be one of"):
        write_model_card(tmp_path, base_model="org/b", kind="full")
    with pytest.raises(MoetuneError, match="image .* does not exist"):
        write_model_card(tmp_path, base_model="org/b", images=[tmp_path / "missing.png"])
    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(MoetuneError, match="cannot read metrics"):
        write_model_card(tmp_path, base_model="org/b")
    assert read_card_metadata(tmp_path / "README.md") == {}


def test_the_token_never_reaches_a_written_file(tmp_path, monkeypatch):
    """Issue 8: with a token configured, nothing merge / combine / cards / push write contains it."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    base = tiny_models.save("qwen3_moe", tmp_path / "base")
    adapters = []
    for seed in (1, 2):
        model = get_peft_model(tiny_models.build("qwen3_moe"), LoraConfig(r=2, target_modules=["q_proj"]))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
        model.save_pretrained(tmp_path / f"adapter{seed}")
        # a recipe that carries the token, under a secret-looking key and inside an innocent value
        recipe = {"output": {"hub_token": TOKEN}, "notes": f"pushed with {TOKEN}"}
        write_model_card(tmp_path / f"adapter{seed}", base_model="org/base", recipe=recipe)
        adapters.append(tmp_path / f"adapter{seed}")
    report = str(merge_into_base(base, adapters[0], tmp_path / "merged"))
    report += str(combine_adapters(adapters, tmp_path / "combined", method="svd"))
    report += str(push_folder(tmp_path / "merged", "alice/merged", dry_run=True))
    assert TOKEN not in report
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "base" not in p.parts]
    assert len(written) > 10
    for path in written:
        assert TOKEN.encode() not in path.read_bytes(), path
    assert "<redacted>" in (tmp_path / "adapter1" / "README.md").read_text()
