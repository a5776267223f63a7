"""The optimizer and its schedule (finetune/optimizer.py): AdamW on the trainable parameters only, and
the learning rate of each step as train.warmup_* / train.schedule define it."""

from __future__ import annotations

import math

import pytest
import torch

from finetune.optimizer import make_optimizer, make_scheduler
from finetune.recipe import TrainSection

LR, TOTAL = 1e-3, 10


def lrs(t: TrainSection, total: int = TOTAL) -> list[float]:
    """The learning rate of steps 1..total (what the loop's scheduler.step() after each update gives)."""
    optimizer = make_optimizer(torch.nn.Linear(2, 2), t)
    scheduler = make_scheduler(t, optimizer, total)
    rates = []
    for _ in range(total):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


def test_only_trainable_parameters_are_optimised():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    model[0].requires_grad_(False)
    optimizer = make_optimizer(model, TrainSection(lr=LR, weight_decay=0.1))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in params} == {id(p) for p in model[1].parameters()}
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["lr"] == LR and optimizer.param_groups[0]["weight_decay"] == 0.1


@pytest.mark.parametrize("warmup", [{"warmup_steps": 4}, {"warmup_fraction": 0.4}])
def test_linear_warmup_then_cosine_decay_to_zero(warmup):
    rates = lrs(TrainSection(lr=LR, schedule="cosine", **warmup))
    assert rates[:5] == pytest.approx([0.0, LR / 4, LR / 2, 3 * LR / 4, LR])  # 4 warmup steps either way
    decay = [LR * 0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(1, 6)]
    assert rates[5:] == pytest.approx(decay)


def test_linear_decay_and_constant_after_warmup():
    assert lrs(TrainSection(lr=LR, schedule="linear", warmup_steps=2)) == pytest.approx(
        [0.0, LR / 2] + [LR * (8 - k) / 8 for k in range(8)]
    )
    assert lrs(TrainSection(lr=LR, schedule="constant", warmup_steps=2)) == pytest.approx(
        [0.0, LR / 2] + [LR] * 8
    )


def test_no_warmup_starts_at_the_peak():
    assert lrs(TrainSection(lr=LR, schedule="constant")) == pytest.approx([LR] * TOTAL)
