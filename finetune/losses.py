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
averaged. The preference objectives of `train.method` (dpo, orpo, simpo; the second half of this
file) are one more forward function the one loop calls: their unit is the pair instead of the label
token, and the same `StepLoss` normalises them.
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
    metric_sums: torch.Tensor | None = None  # (4,) preference: PREFERENCE_METRICS summed over the pairs


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

    For a preference objective `label_tokens` is the step's global count of pairs.

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
        self.metric_sums: torch.Tensor | None = None

    @classmethod
    def of_step(cls, acc: Any, micro_batches: list[dict], *, pairs: bool, aux_coef: float) -> StepLoss:
        """The objective of the step made of `micro_batches`, its unit (label tokens, or `pairs` for a
        preference objective) counted on every process before the first forward. Every process calls it."""
        if pairs:
            local = sum(count_pairs(b) for b in micro_batches)
        else:
            local = sum(count_label_tokens(b["labels"]) for b in micro_batches if "labels" in b)
        return cls(
            label_tokens=int(acc.reduce(torch.tensor(local, device=acc.device), "sum").item()),
            micro_batches=len(micro_batches),
            num_processes=acc.num_processes,
            aux_coef=aux_coef,
            device=acc.device,
        )

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
        if out.metric_sums is not None:
            sums = out.metric_sums.float()
            self.metric_sums = sums if self.metric_sums is None else self.metric_sums + sums
        return loss

    def totals(self, acc: Any) -> tuple[float, float]:
        """(loss, aux loss) of the whole step on all processes: the token-normalised LM loss plus the
        (batch-mean) contrastive / classification terms, and the mean aux loss. Every process calls it."""
        loss = float(acc.reduce(self.lm_sum, "sum").item()) / self.label_tokens
        loss += float(acc.reduce(self.multimodal_sum, "mean").item()) / self.micro_batches
        aux = float(acc.reduce(self.aux_sum, "mean").item()) / self.micro_batches
        return loss, aux

    def metrics(self, acc: Any) -> dict[str, float]:
        """The preference metrics of the step (means over all its pairs); {} for SFT. Every process calls it."""
        if self.metric_sums is None:
            return {}
        sums = acc.reduce(self.metric_sums, "sum") / self.label_tokens  # label_tokens counts pairs here
        return {f"train/{name}": float(v) for name, v in zip(PREFERENCE_METRICS, sums.tolist())}


def multimodal_losses(out: Any, model: torch.nn.Module) -> torch.Tensor | None:
    """The contrastive and classification losses of a multimodal model, weighted by its config."""
    config = getattr(model, "config", None)
    parts = [
        float(getattr(config, f"{name}_loss_coef", 0.0) or 0.0) * loss.float()
        for name in ("contrastive", "classification")
        if (loss := getattr(out, f"{name}_loss", None)) is not None
    ]
    return torch.stack(parts).sum() if parts else None


# ----------------------------------------------------------------------------- preference objectives
#
# A preference batch (finetune/data/preference.py) holds B pairs as 2B rows: the B chosen sequences,
# then the B rejected ones, each `prompt + completion` with labels only on the completion. One forward
# of the policy (adapter on) gives both halves' log-probabilities; DPO's reference is the same model
# with the adapter disabled (no second copy). Every objective gives one loss per pair; the step sums
# them and divides by the GLOBAL pair count (as SFT does with label tokens), so accumulation and the
# number of processes never change the gradient. The formulas are TRL's (trl 1.16: DPOTrainer,
# experimental ORPOTrainer / CPOTrainer with loss_type simpo), checked in tests/finetune/test_preference_losses.py;
# docs/preference.md says where moetune differs.

PREFERENCE_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probabilities of each row's label tokens (N,), their counts (N,)): position t predicts t+1.

    `logits` (N, T', V) may carry modality prefix slots before the text; `labels` (N, T)."""
    logits = logits[:, -labels.shape[1] :][:, :-1, :].float()  # (N, T-1, V)
    targets = labels[:, 1:].to(logits.device)  # (N, T-1)
    mask = targets != IGNORE_INDEX
    picked = torch.gather(logits.log_softmax(-1), -1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1), mask.sum(-1)


@dataclass
class PairLogps:
    """Log-probabilities of the chosen and rejected completions of B pairs, and their token counts."""

    chosen: torch.Tensor  # (B,) summed over the completion tokens
    rejected: torch.Tensor  # (B,)
    chosen_tokens: torch.Tensor  # (B,)
    rejected_tokens: torch.Tensor  # (B,)

    @classmethod
    def of(cls, logits: torch.Tensor, labels: torch.Tensor) -> PairLogps:
        logps, counts = sequence_logps(logits, labels)
        chosen, rejected = logps.chunk(2)
        chosen_tokens, rejected_tokens = counts.chunk(2)
        return cls(chosen, rejected, chosen_tokens, rejected_tokens)

    def averaged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token means (ORPO, SimPO, IPO): length no longer rewards or punishes a completion."""
        return (
            self.chosen / self.chosen_tokens.clamp(min=1),
            self.rejected / self.rejected_tokens.clamp(min=1),
        )


def _smoothed_sigmoid(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-log sigma(logits), with a share `label_smoothing` of the pairs taken as flipped (cDPO)."""
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def dpo_loss(
    policy: PairLogps,
    reference: PairLogps,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO per pair: (losses (B,), chosen rewards (B,), rejected rewards (B,)); rewards = beta x log-ratio.

    sigmoid: -log sigma(beta (r_c - r_r)) of the log-ratios r = log pi - log pi_ref (cDPO with
    label_smoothing); hinge: relu(1 - beta delta); ipo: (delta_avg - 1 / (2 beta))^2 on per-token means;
    robust: rDPO, the unbiased estimate under label noise `label_smoothing`."""
    chosen_ratio = policy.chosen - reference.chosen
    rejected_ratio = policy.rejected - reference.rejected
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid(beta * delta, label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        ipo_delta = chosen_ratio / policy.chosen_tokens.clamp(
            min=1
        ) - rejected_ratio / policy.rejected_tokens.clamp(min=1)
        losses = (ipo_delta - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        losses = (clean - flipped) / (1 - 2 * label_smoothing)
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}")  # the recipe check names the choices
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(policy: PairLogps, *, lam: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO per pair: NLL of the chosen completion (per-token mean) - lambda log sigma(log odds ratio).

    The odds of a completion use its per-token mean log-probability p: odds = p / (1 - p); no reference
    model. Rewards = lambda x mean log-probability, as TRL logs them."""
    chosen, rejected = (x.float() for x in policy.averaged())
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    losses = -chosen - lam * F.logsigmoid(log_odds)
    return losses, lam * chosen.detach(), lam * rejected.detach()


def simpo_loss(
    policy: PairLogps, *, beta: float, gamma: float, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO per pair: -log sigma(beta (mean log p_c - mean log p_r) - gamma); no reference model.

    gamma is the target reward margin; rewards = beta x mean log-probability."""
    chosen, rejected = policy.averaged()
    losses = _smoothed_sigmoid(beta * (chosen - rejected) - gamma, label_smoothing)
    return losses, beta * chosen.detach(), beta * rejected.detach()


@dataclass
class PreferenceObjective:
    """`train.method` with its `train.preference` settings, and the model whose adapter is switched off
    for DPO's reference (the unwrapped PEFT model: the reference never goes through DDP)."""

    method: str  # dpo | orpo | simpo
    beta: float
    loss_type: str
    label_smoothing: float
    lam: float
    gamma: float
    reference_model: torch.nn.Module | None = None

    @property
    def needs_reference(self) -> bool:
        return self.method == "dpo"

    def reference_logps(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> PairLogps:
        """The policy with its adapter disabled, without gradients: the base model DPO anchors to."""
        with torch.no_grad(), self.reference_model.disable_adapter():
            logits = self.reference_model(**inputs, use_cache=False).logits
        return PairLogps.of(logits, labels)

    def losses(self, policy: PairLogps, reference: PairLogps | None) -> tuple[torch.Tensor, ...]:
        """(losses, chosen rewards, rejected rewards), each (B,)."""
        if self.method == "dpo":
            return dpo_loss(
                policy,
                reference,
                beta=self.beta,
                loss_type=self.loss_type,
                label_smoothing=self.label_smoothing,
            )
        if self.method == "orpo":
            return orpo_loss(policy, lam=self.lam)
        return simpo_loss(policy, beta=self.beta, gamma=self.gamma, label_smoothing=self.label_smoothing)


def preference_forward(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], objective: PreferenceObjective, *, routes: bool
) -> ForwardLoss:
    """One micro-batch of pairs: the summed per-pair losses, the aux loss (policy forward only) and the
    summed metrics (`PREFERENCE_METRICS`; the step divides them by the pair count)."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs, use_cache=False, **({"output_router_logits": True} if routes else {}))
    policy = PairLogps.of(out.logits, labels)
    reference = objective.reference_logps(inputs, labels) if objective.needs_reference else None
    losses, chosen, rejected = objective.losses(policy, reference)
    metrics = torch.stack(
        [chosen.sum(), rejected.sum(), (chosen > rejected).float().sum(), (chosen - rejected).sum()]
    ).detach()
    return ForwardLoss(
        loss_sum=losses.sum(),
        aux_loss=getattr(out, "aux_loss", None) if routes else None,
        router_logits=getattr(out, "router_logits", None) if routes else None,
        multimodal_loss=None,
        metric_sums=metrics,
    )


def count_pairs(batch: dict[str, torch.Tensor]) -> int:
    """Pairs in a preference batch: its rows are the chosen then the rejected sequences."""
    return batch["input_ids"].shape[0] // 2
