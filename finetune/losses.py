"""The losses of one training step, and how they are normalised.

The loop takes one backward per micro-batch, so each micro-batch contributes its own term
(`StepLoss.term`); the terms of a step add up to:

    sum of the next-token losses of all label tokens of the step, on all processes
    ------------------------------------------------------------------------------  + aux + multimodal
              the GLOBAL count of those label tokens (gathered before the first forward)

so padding, uneven examples, accumulation and the number of processes never change the gradient
(2 processes x batch 4 equals 1 process x batch 4 x grad_accum 2). The MoE load-balancing loss
(`aux_loss`, when the model returns it) is averaged over the micro-batches and weighted by the
model's own `router_aux_loss_coef`; a multimodal model's contrastive and classification losses
(per-example means already) are averaged over the micro-batches too.

The next-token loss is computed here, not by the model, so that it can be summed rather than
averaged. Another objective (a preference loss for `train.method`) is one more function here that
the one loop calls; it is not a second loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # labels of tokens that carry no loss (prompt, padding, document starts)


@dataclass
class ForwardLoss:
    """What one micro-batch's forward gives the loop."""

    loss_sum: torch.Tensor  # () next-token cross-entropy summed over the label tokens
    aux_loss: torch.Tensor | None  # () the MoE load-balancing loss, when the model routes
    router_logits: tuple[torch.Tensor, ...] | None  # one (B*T, E) per MoE layer, when the model routes
    multimodal_loss: torch.Tensor | None  # () weighted contrastive + classification, when present


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy summed over the label tokens: position t predicts t+1.

    `logits` (B, T', V) may carry T' - T modality prefix slots before the text; `labels` (B, T) are
    aligned with the text's input ids (-100 where no loss is taken).
    """
    logits = logits[:, -labels.shape[1] :][:, :-1, :].float()  # (B, T-1, V)
    targets = labels[:, 1:].to(logits.device)  # (B, T-1)
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def count_label_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry a loss: labels after the shift that are not IGNORE_INDEX."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum().item())


def forward_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, routes: bool) -> ForwardLoss:
    """One micro-batch through `model`: its summed next-token loss, the MoE aux loss and router logits
    (when `routes`), and the multimodal losses."""
    labels = batch.get("labels")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if routes:
        inputs["output_router_logits"] = True
    out = model(**inputs, use_cache=False)
    if labels is None or out.logits is None:  # alignment / classification batches carry no text targets
        loss_sum = torch.zeros((), device=labels.device if labels is not None else "cpu")
    else:
        loss_sum = lm_loss_sum(out.logits, labels)
    return ForwardLoss(
        loss_sum=loss_sum,
        aux_loss=getattr(out, "aux_loss", None) if routes else None,
        router_logits=getattr(out, "router_logits", None) if routes else None,
        multimodal_loss=multimodal_losses(out, model),
    )


class StepLoss:
    """One optimizer step's objective over its micro-batches (the module docstring has the sum).

    `term` gives each micro-batch's term for its backward; the detached parts are kept, and `totals`
    reduces them over the processes into the step's logged loss and aux loss.
    """

    def __init__(
        self, *, label_tokens: int, micro_batches: int, num_processes: int, aux_coef: float, device: Any
    ) -> None:
        self.label_tokens = max(label_tokens, 1)  # the step's GLOBAL count of label tokens
        self.micro_batches, self.num_processes, self.aux_coef = micro_batches, num_processes, aux_coef
        self.lm_sum = torch.zeros((), device=device)
        self.aux_sum = torch.zeros((), device=device)
        self.multimodal_sum = torch.zeros((), device=device)

    def term(self, out: ForwardLoss) -> torch.Tensor:
        """This micro-batch's term. x `num_processes`: DDP averages gradients over the processes, and
        the global count already spans them."""
        loss = out.loss_sum * self.num_processes / self.label_tokens
        self.lm_sum += out.loss_sum.detach().float()
        if out.aux_loss is not None:
            loss = loss + self.aux_coef * out.aux_loss / self.micro_batches
            self.aux_sum += out.aux_loss.detach().float()
        if out.multimodal_loss is not None:  # per-example means: averaged over the micro-batches
            loss = loss + out.multimodal_loss / self.micro_batches
            self.multimodal_sum += out.multimodal_loss.detach().float()
        return loss

    def totals(self, acc: Any) -> tuple[float, float]:
        """(loss, aux loss) of the whole step on all processes: the token-normalised LM loss plus the
        (batch-mean) contrastive / classification terms, and the mean aux loss. Every process calls it."""
        loss = float(acc.reduce(self.lm_sum, "sum").item()) / self.label_tokens
        loss += float(acc.reduce(self.multimodal_sum, "mean").item()) / self.micro_batches
        aux = float(acc.reduce(self.aux_sum, "mean").item()) / self.micro_batches
        return loss, aux


def multimodal_losses(out: Any, model: torch.nn.Module) -> torch.Tensor | None:
    """The contrastive and classification losses of a multimodal model, weighted by its config."""
    config = getattr(model, "config", None)
    parts = [
        float(getattr(config, f"{name}_loss_coef", 0.0) or 0.0) * loss.float()
        for name in ("contrastive", "classification")
        if (loss := getattr(out, f"{name}_loss", None)) is not None
    ]
    return torch.stack(parts).sum() if parts else None
