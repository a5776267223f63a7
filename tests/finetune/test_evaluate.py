"""Loss normalisation, routing statistics and `moetune experts profile` on tiny models."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from adapters import MoetuneError, apply_lora, load_selection
from finetune.evaluate import evaluate_loss, profile_experts, read_texts, routing_stats
from tests.helpers.models import build, random_batch

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def test_evaluate_loss_counts_real_label_tokens_only():
    model = build("qwen3_moe")
    short, long = random_batch(1, 6, seed=1), random_batch(1, 14, seed=2)
    short["labels"][0, :3] = -100  # e.g. a prompt that does not count
    result = evaluate_loss(model, [short, long])

    def summed(batch):
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
        return float(loss), int((labels != -100).sum())

    with torch.no_grad():
        (a, n_a), (b, n_b) = summed(short), summed(long)
    assert result["tokens"] == n_a + n_b == 3 + 13
    assert result["loss"] == pytest.approx((a + b) / (n_a + n_b), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-6)
    assert not model.training  # build() returns eval mode; evaluate_loss restores it
    model.train()
    evaluate_loss(model, [short])
    assert model.training


@pytest.mark.parametrize("family", ["moetune", "deepseek_v3"])
def test_routing_stats_per_layer_with_and_without_adapters(family):
    batch = random_batch(2, 10)
    batch["attention_mask"][1, 6:] = 0  # 4 padding tokens are not counted
    base = routing_stats(build(family), [batch])
    model = build(family)
    moe_layers = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    assert base["layers"] == moe_layers and base["tokens"] == 16 and base["top_k"] == 2
    for counts, ratio, gate in zip(base["counts"], base["token_ratio"], base["gate_score"]):
        assert sum(counts) == 16 * 2
        assert sum(ratio) == pytest.approx(2.0)
        assert all(g >= 0 for g in gate) and sum(gate) > 0
    adapted = apply_lora(build(family), targets=["experts"], r=2)  # B = 0: same routing through the fast path
    assert routing_stats(adapted, [batch])["counts"] == base["counts"]


def test_profile_experts_writes_stats_heatmap_and_a_loadable_selection(tmp_path):
    data = tmp_path / "domain.jsonl"
    data.write_text(
        "\n".join(json.dumps({"text": f"record {i}: " + "alpha beta gamma " * i}) for i in range(1, 7))
    )
    report = profile_experts(
        "preset:tiny", data, tmp_path / "out", threshold=0.3, max_examples=4, max_length=32
    )
    assert report.examples == 4 and "(4 examples)" in str(report)
    assert report.files == [
        tmp_path / "out" / n for n in ("expert_stats.json", "expert_load.png", "selection.json")
    ]
    stats = json.loads((tmp_path / "out" / "expert_stats.json").read_text())
    assert stats["examples"] == 4 and len(stats["token_ratio"]) == len(stats["layers"]) == 2
    png = (tmp_path / "out" / "expert_load.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    selection = load_selection(tmp_path / "out" / "selection.json")
    assert set(selection) == set(stats["layers"])
    for layer, ids in selection.items():
        ratio = stats["token_ratio"][stats["layers"].index(layer)]
        share = sum(ratio[e] for e in ids) / sum(ratio)
        assert share >= 0.3 - 1e-9  # reached the threshold ...
        assert share - min(ratio[e] for e in ids) / sum(ratio) < 0.3  # ... and not one expert later

    long_doc = tmp_path / "long.txt"
    long_doc.write_text("word " * 200)  # cut into windows of 16 tokens, not truncated to the first
    report = profile_experts("preset:tiny", long_doc, tmp_path / "long", max_examples=5, max_length=16)
    assert (report.tokens, report.examples) == (80, 5) and "80 tokens (5 examples)" in str(report)


def test_read_texts_follows_the_recipe_source_rules(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("first document")
    (tmp_path / "docs" / "b.py").write_text("def f():\n    return 1\n")  # code counts as text
    assert read_texts(tmp_path / "docs") == ["first document", "def f():\n    return 1\n"]
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert read_texts(tmp_path / "b.jsonl") == ["one", "two"]
    assert read_texts(tmp_path / "b.jsonl", max_examples=1) == ["one"]
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(MoetuneError, match="no 'text' field"):
        read_texts(tmp_path / "bad.jsonl")
    with pytest.raises(MoetuneError, match="no such file"):
        read_texts(tmp_path / "missing.jsonl")
    with pytest.raises(MoetuneError, match="--metric"):
        profile_experts("preset:tiny", tmp_path / "a.txt", tmp_path / "o", metric="loudness")
