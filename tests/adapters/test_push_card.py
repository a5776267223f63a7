"""`moetune push` on folders moetune did not write: PEFT's `save_pretrained` from Python, no card at all.

The push writes or completes the card in the uploaded copy (base model, license, tags), warns one
line per thing it could not fill, goes on, and never changes the folder itself.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import yaml
from peft import LoraConfig, get_peft_model

import cli
from adapters.errors import MoetuneError
from adapters.hub import push_folder
from adapters.model_card import split_front_matter
from tests.helpers import models as tiny_models
from tests.helpers.hub import FakeHub, run_cli


@pytest.fixture
def peft_folder(tmp_path) -> Path:
    """An adapter exactly as plain PEFT's save_pretrained writes it (its template card, base_model '')."""
    model = tiny_models.build("qwen3_moe")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, config)
        peft_model.save_pretrained(tmp_path / "peft-adapter")
    folder = tmp_path / "peft-adapter"
    assert (folder / "README.md").is_file()  # PEFT's own template card
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _metadata(text: str) -> dict:
    return yaml.safe_load(split_front_matter(text)[0])


def test_dry_run_of_a_peft_api_folder_completes_the_card_and_warns(peft_folder, capsys):
    before = _snapshot(peft_folder)
    assert cli.main(["push", str(peft_folder), "--repo-id", "you/adapter", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "model card: valid after completing the uploaded copy" in out
    assert "tags moe" in out and "license other" in out
    warned = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert any("--base-model" in line for line in warned) and any("--license" in line for line in warned)
    assert _snapshot(peft_folder) == before  # nothing in the folder changed


def test_push_with_base_model_and_license_uploads_a_complete_card(peft_folder, tmp_path):
    before = _snapshot(peft_folder)
    with FakeHub() as hub:
        code, out, err = run_cli(
            "push", str(peft_folder), "--repo-id", "alice/peft-lora", "--base-model", "Qwen/Qwen3-30B-A3B",
            "--license", "apache-2.0", endpoint=hub.url, home=tmp_path / "hf",
        )  # fmt: skip
        assert code == 0, err
        arrived = hub.files("alice/peft-lora")
    assert "warning:" not in out
    meta = _metadata(arrived["README.md"].decode())
    assert meta["base_model"] == "Qwen/Qwen3-30B-A3B" and meta["license"] == "apache-2.0"
    assert meta["library_name"] == "peft" and {"moe", "lora"} <= set(meta["tags"])
    assert json.loads(arrived["adapter_config.json"])["base_model_name_or_path"] == "Qwen/Qwen3-30B-A3B"
    assert arrived["adapter_model.safetensors"] == before["adapter_model.safetensors"]
    assert _snapshot(peft_folder) == before


def test_a_folder_without_a_card_gets_one_written(peft_folder):
    (peft_folder / "README.md").unlink()
    report = push_folder(peft_folder, "you/adapter", dry_run=True, license="mit")
    assert "wrote a model card (there was no README.md)" in str(report)
    assert "README.md" in dict(report.files)  # listed for upload
    assert any(line.endswith("  README.md") for line in str(report).splitlines())
    assert not (peft_folder / "README.md").exists()


def test_a_card_without_metadata_keeps_its_text_under_new_metadata(peft_folder):
    from adapters.card_completion import complete_card

    (peft_folder / "README.md").write_text("# My adapter\n\nTrained on my notes.\n")
    card = complete_card(peft_folder, base_model="org/base", license="mit")
    front, body = split_front_matter(card.text)
    assert yaml.safe_load(front)["base_model"] == "org/base"
    assert "# My adapter" in body and "Trained on my notes." in body


def test_a_base_model_that_is_no_hub_id_is_refused_in_one_line(peft_folder):
    with pytest.raises(MoetuneError, match="--base-model '/home/me/base' is not a Hub id") as err:
        push_folder(peft_folder, "you/adapter", dry_run=True, base_model="/home/me/base")
    assert "\n" not in str(err.value)
