"""Every file under recipes/ (recursively) is validated: recipes load, open with a header that gives the
exact command, run their data pipeline (CPU recipes) and fit a tiny model of their family (all recipes);
accelerate configs parse; sample data loads."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

from finetune.recipe import RECIPES_DIR, esft_profile, find_recipe, header_comment, list_recipes, load_recipe
from tests.helpers.tokenizers import tiny_tokenizer

ALL_FILES = sorted(Path(root, name) for root, _, names in os.walk(RECIPES_DIR) for name in names)
ACCELERATE = [p for p in ALL_FILES if p.relative_to(RECIPES_DIR).parts[0] == "accelerate"]
SAMPLES = [p for p in ALL_FILES if p.relative_to(RECIPES_DIR).parts[0] == "data"]
RECIPES = [p for p in ALL_FILES if p not in ACCELERATE and p not in SAMPLES]
NAMES = {p: p.relative_to(RECIPES_DIR).with_suffix("").as_posix() for p in RECIPES}
# Multimodal recipes (mm-*) belong to the multimodal half; they are validated here like the others.
TEXT_RECIPES = [p for p in RECIPES if not p.name.startswith("mm-")]
FAMILY = {"deepseek": "deepseek_v3", "qwen3": "qwen3_moe", "mixtral": "mixtral", "preset:": "moetune"}


def test_every_file_under_recipes_is_checked_by_one_of_the_tests_below():
    assert len(ALL_FILES) == len(RECIPES) + len(ACCELERATE) + len(SAMPLES)
    assert len(TEXT_RECIPES) >= 8 and len(ACCELERATE) >= 3 and len(SAMPLES) >= 2
    assert all(p.suffix == ".yaml" for p in RECIPES + ACCELERATE), "recipes and configs are .yaml"
    assert all(p.suffix == ".jsonl" for p in SAMPLES)
    assert sorted(name for name, _ in list_recipes()) == sorted(NAMES.values())


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: NAMES[p])
def test_recipe_loads_and_its_header_says_what_it_needs_and_the_exact_command(path):
    recipe = load_recipe(str(path))
    header = header_comment(path.read_text())
    assert header and header[0], "a recipe opens with a comment block; its first line is the description"
    text = "\n".join(header)
    assert re.search(r"what it does", text, re.I) and re.search(r"what it needs", text, re.I)
    lines = [re.sub(r"^commands?:\s*", "", line, flags=re.I) for line in header]
    commands = [line for line in lines if re.match(r"(moetune|accelerate launch) ", line)]
    assert commands, "the header gives the exact command"
    trains = [shlex.split(c) for c in commands if " train " in c]
    assert trains, "one command trains this recipe"
    for words in trains:
        target = words[words.index("train") + 1]
        assert find_recipe(target).resolve() == path.resolve(), f"{target} in the header is another recipe"
        for flag, value in zip(words, words[1:]):
            if flag == "--config_file":
                assert (RECIPES_DIR.parent / value).is_file(), f"{value} named in the header does not exist"
    assert recipe.output.dir


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_configs_parse_with_accelerate(path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path))
    assert config.distributed_type is not None and config.num_processes >= 1


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_sample_data_is_used_by_a_recipe_and_builds(path, tmp_path):
    users = [
        p
        for p in TEXT_RECIPES
        if load_recipe(str(p)).data.train == path.relative_to(RECIPES_DIR.parent).as_posix()
    ]
    assert users, f"{path} is used by no recipe"
    # Validated through the recipe that uses it, with its format and fields.
    data = load_recipe(str(users[0])).data
    data.train = str(path)
    from finetune.data import prepare_datasets

    prepared = prepare_datasets(data, tiny_tokenizer(), seed=0)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert prepared.stats.train.records + prepared.stats.eval.records == len(lines)
    assert prepared.stats.train.skipped == prepared.stats.train.truncated == 0


CPU_RECIPES = [p for p in TEXT_RECIPES if load_recipe(str(p)).model.name.startswith("preset:")]


@pytest.mark.parametrize("path", CPU_RECIPES, ids=lambda p: NAMES[p])
def test_cpu_recipe_data_pipeline_runs(path, monkeypatch):
    """The data section as shipped (a few records of the large corpora, to stay fast) yields batches."""
    from finetune.data import make_collator, prepare_datasets

    monkeypatch.chdir(RECIPES_DIR.parent)  # recipe paths are relative to the repository root
    recipe = load_recipe(str(path), ["data.max_examples=6", "data.max_eval_examples=2"])
    tok = tiny_tokenizer()
    prepared = prepare_datasets(recipe.data, tok, seed=recipe.train.seed)
    assert len(prepared.train) > 0 and prepared.eval is not None and len(prepared.eval) > 0
    batch = make_collator(recipe.data, tok)([prepared.train[i] for i in range(min(2, len(prepared.train)))])
    assert batch["input_ids"].shape[1] <= recipe.data.max_length
    assert (batch["labels"] != -100).any()


@pytest.mark.parametrize("path", TEXT_RECIPES, ids=lambda p: NAMES[p])
def test_adapter_section_fits_a_tiny_model_of_the_recipe_family(path, tmp_path):
    """Targets that match nothing, a bad layer range or expert selection fail here, not on a GPU."""
    from adapters import apply_lora
    from tests.helpers.models import build

    recipe = load_recipe(str(path))
    family = next(f for key, f in FAMILY.items() if key in recipe.model.name.lower())
    model = build(family)
    adapter = dataclasses.asdict(recipe.adapter)
    if isinstance(adapter["experts"], str) or esft_profile(adapter["experts"]):
        # a selection.json from `experts profile` or one made in the run: a stand-in for the tiny model
        moe_layer = model.config.num_hidden_layers - 1
        selection = tmp_path / "selection.json"
        selection.write_text(json.dumps({"layers": {str(moe_layer): [0, 1]}}))
        adapter["experts"] = str(selection)
    peft_model = apply_lora(model, **adapter)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable
    for group in recipe.adapter.targets:
        assert group != "experts" or any("expert" in n for n in trainable), f"{group} adapted nothing"


def test_recipe_yaml_files_are_plain_mappings_of_sections():
    for path in RECIPES:
        raw = yaml.safe_load(path.read_text())
        assert set(raw) <= {"model", "adapter", "data", "train", "output", "eval"}, path
