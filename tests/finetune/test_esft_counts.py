"""ESFT: one trainable-parameter count everywhere (target report, training summary, metrics.json, plan).

"Trainable" = what training can change: with an expert selection, the other experts' LoRA factors
are stored (PEFT keeps dense stacks) but stay zero, so they are not counted.
"""

from __future__ import annotations

import json
import re

import torch

from adapters import apply_lora
from adapters.targets import count_trainable, target_report
from finetune.train import launch_training
from tests.helpers import models as tiny_models
from tests.helpers.runs import write_corpus, write_recipe

SELECTION = {0: [1, 4], 1: [2]}
R = 4


def _expected(model, selection) -> int:
    """Attention LoRA r*(in+out) per projection + expert LoRA r*(in+out) per selected expert and weight."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".self_attn." in name:
            total += R * (module.in_features + module.out_features)
    for name, param in model.named_parameters():
        if ".mlp.experts." in name and param.ndim == 3:
            layer = int(re.search(r"layers\.(\d+)\.", name)[1])
            _, out_features, in_features = param.shape  # (E, out, in)
            total += R * (in_features + out_features) * len(selection.get(layer, []))
    return total


def test_report_and_count_agree_and_count_only_selected_experts():
    model = tiny_models.build("moetune")
    expected = _expected(model, SELECTION)
    peft_model = apply_lora(model, targets=["attention", "experts"], r=R, alpha=8, experts=SELECTION)
    assert count_trainable(peft_model) == expected
    assert expected < sum(p.numel() for p in peft_model.parameters() if p.requires_grad)  # dense stacks
    report = target_report(peft_model)
    assert "(3/16 experts)" in report  # 2 + 1 selected of 8 experts in each of 2 MoE layers
    assert re.search(rf"total\s+{expected:,}\s", report), report


def test_only_the_counted_parameters_change_in_training():
    model = tiny_models.build("moetune")
    peft_model = apply_lora(model, targets=["attention", "experts"], r=R, alpha=8, experts=SELECTION)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for seed in range(3):
        batch = tiny_models.random_batch(batch=4, length=32, seed=seed)
        peft_model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = sum(int((p.detach() != b).sum()) for p, b in zip(params, before))
    assert 0 < changed <= count_trainable(peft_model)
    stored = sum(p.numel() for p in params)
    assert stored - count_trainable(peft_model) > 0  # the unselected experts' factors: stored, never changed


def test_training_summary_and_metrics_use_the_report_count(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "train.jsonl", n=16)
    recipe = write_recipe(
        tmp_path, corpus, adapter={"targets": ["attention", "experts"], "experts": SELECTION},
        data={"eval_fraction": None, "max_length": 32}, train={"max_steps": 1, "save_every": None},
    )  # fmt: skip
    summary = str(launch_training(str(recipe)))
    printed = capsys.readouterr().out
    reported = int(re.search(r"total\s+([\d,]+)\s", printed)[1].replace(",", ""))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["trainable_params"] == reported
    assert f"trainable parameters: {reported:,} of" in summary
