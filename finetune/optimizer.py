"""The optimizer of a run and its learning-rate schedule, as `train.*` asks.

AdamW on the trainable parameters only (the LoRA factors; the frozen base gets no optimizer state),
then linear warmup (`train.warmup_steps` or `train.warmup_fraction`) and cosine / linear decay to 0,
or a constant rate, through transformers' scheduler factory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from finetune.recipe import TrainSection

SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}  # train.schedule


def make_optimizer(model: torch.nn.Module, t: TrainSection) -> torch.optim.Optimizer:
    """AdamW over the parameters that require gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


def make_scheduler(
    t: TrainSection, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup, then cosine / linear decay to 0, or constant."""
    from transformers import get_scheduler

    if t.warmup_steps is not None:
        warmup = t.warmup_steps
    elif t.warmup_fraction is not None:
        warmup = round(t.warmup_fraction * total_steps)
    else:
        warmup = 0
    return get_scheduler(
        SCHEDULES[t.schedule], optimizer, num_warmup_steps=warmup, num_training_steps=total_steps
    )
