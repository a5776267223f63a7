"""ESFT in one recipe: `adapter.experts: {threshold: P}` profiles the base on the training data, writes
selection.json + its heatmap in the run folder, and trains LoRA only on the selected experts."""

from __future__ import annotations

import json

import pytest
import torch

from adapters.peft_format import group_factors, read_adapter, resolve_pairs
from finetune.data import prepare_datasets
from finetune.errors import MoetuneError
from finetune.evaluate import routing_stats
from finetune.loading import load_model
from finetune.recipe import load_recipe
from finetune.train import launch_training
from tests.helpers.runs import write_corpus, write_recipe

THRESHOLD = 0.5


@pytest.fixture(scope="module")
def esft_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("esft")
    recipe = write_recipe(
        tmp,
        write_corpus(tmp / "train.jsonl", n=24),
        adapter={"targets": ["attention", "experts"], "experts": {"threshold": THRESHOLD}},
        data={"eval_fraction": None, "max_length": 32},
        train={"max_steps": 3, "save_every": None, "lr": 1e-2},
    )
    launch_training(str(recipe))
    return tmp / "run"


def test_the_selection_covers_the_threshold_of_each_layers_routed_tokens(esft_run):
    saved = json.loads((esft_run / "selection.json").read_text())
    assert saved["threshold"] == THRESHOLD and saved["metric"] == "token_ratio"
    assert saved["data"] == "the training data" and saved["tokens"] > 0
    assert (esft_run / "selection.png").stat().st_size > 0
    selection = {int(k): v for k, v in saved["layers"].items()}
    assert selection and all(0 < len(ids) < 8 for ids in selection.values())  # tiny: 8 experts per layer
    # The base's routing on the run's own training examples, measured here independently.
    model, tokenizer = load_model("preset:tiny")
    examples = prepare_datasets(load_recipe(str(esft_run / "recipe.yaml")).data, tokenizer, seed=0).train
    batches = [
        {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        for ids in examples["input_ids"]
    ]
    stats = routing_stats(model, batches)
    assert stats["tokens"] == saved["tokens"]
    for layer, shares in zip(stats["layers"], stats["token_ratio"]):
        share = torch.tensor(shares) / sum(shares)
        chosen = selection[layer]
        top = share.argsort(descending=True)[: len(chosen)].sort().values.tolist()
        assert chosen == top  # the most used experts
        assert float(share[chosen].sum()) >= THRESHOLD - 1e-9  # reach the threshold
        assert float(share[chosen].sum() - share[chosen].min()) < THRESHOLD  # and no more than needed


def test_only_the_selected_experts_lora_is_trained(esft_run):
    selection = {
        int(k): v for k, v in json.loads((esft_run / "selection.json").read_text())["layers"].items()
    }
    config, tensors = read_adapter(esft_run / "adapter")
    pairs = resolve_pairs(config, group_factors(tensors, "adapter"), "adapter")
    expert_pairs = [p for p in pairs.values() if p.num_experts > 1]
    assert expert_pairs
    for pair in expert_pairs:
        layer = int(pair.module.split("layers.")[1].split(".")[0])
        delta = pair.delta()  # (E, out, in)
        changed = delta.reshape(delta.shape[0], -1).abs().amax(dim=1) > 0
        assert torch.nonzero(changed).flatten().tolist() == selection[layer], pair.key


def test_esft_keys_are_checked(tmp_path):
    recipe = write_recipe(tmp_path, write_corpus(tmp_path / "t.jsonl", n=4))
    with pytest.raises(MoetuneError, match=r"adapter.experts.threshold must be a number in \(0, 1\]"):
        load_recipe(str(recipe), ["adapter.experts={threshold: 1.5}"])
    with pytest.raises(MoetuneError, match="adapter.experts.treshold is not an ESFT key"):
        load_recipe(str(recipe), ["adapter.experts={treshold: 0.5, threshold: 0.5}"])
    with pytest.raises(MoetuneError, match="'experts' is not in adapter.targets"):
        load_recipe(str(recipe), ["adapter.experts={threshold: 0.5}", "adapter.targets=[attention]"])
