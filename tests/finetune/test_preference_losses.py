"""Preference losses against TRL (trl 1.16, a dev dependency) on fixed batches.

DPO: a real `DPOTrainer` on a tiny MoE model with LoRA (TRL wraps it from a LoraConfig, so its
reference is the adapter disabled, as moetune's): TRL's tokenized pairs, collated batch, loss (with
the MoE aux loss) and logged rewards/* equal moetune's on the same model. ORPO and SimPO: TRL's
loss functions (experimental ORPOTrainer.odds_ratio_loss, CPOTrainer.cpo_loss with loss_type simpo)
and per-token-mean log-probabilities (get_batch_logps) on fixed tensors; they need no model state, so
they are called with the few attributes they read. Where moetune departs from TRL (cDPO label
smoothing on sigmoid, ORPO's NLL on the chosen answer only) the formula is written out here.
"""

from __future__ import annotations

import tempfile
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from finetune.accelerator import reset_state
from finetune.data.preference import PreferenceCollator, preference_pairs
from finetune.losses import IGNORE_INDEX, PairLogps, PreferenceObjective, preference_forward
from finetune.preference import make_objective
from tests.helpers.models import build
from tests.helpers.tokenizers import tiny_tokenizer

RECORDS = [
    {"prompt": "What is 12 plus 30?", "chosen": " 42", "rejected": " 41 or so"},
    {"prompt": "def add(a, b):", "chosen": "\n    return a + b", "rejected": "\n    pass"},
    {"prompt": "The quick brown fox", "chosen": " jumps over the lazy dog.", "rejected": " sleeps."},
]


@pytest.fixture(scope="module")
def dpo():
    """A TRL DPOTrainer on a tiny MoE with attention LoRA; LoRA B drawn so policy != reference."""
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    tok = tiny_tokenizer()
    model = build("moetune", vocab_size=len(tok))
    with warnings.catch_warnings():  # TRL's own use of names transformers deprecated
        warnings.simplefilter("ignore")
        args = DPOConfig(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True, max_length=64, beta=0.2)
        trainer = DPOTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(RECORDS),
            processing_class=tok,
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]),
        )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
    trainer.model.eval()
    yield trainer, tok
    reset_state()  # the Trainer's Accelerator state (bf16) must not leak into later runs in this process


def test_preference_tokens_and_batches_equal_trl(dpo):
    trainer, tok = dpo
    ours = preference_pairs(RECORDS, tok, "prompt", None)
    for row, (prompt, chosen, rejected) in zip(trainer.train_dataset, ours):
        assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == (prompt, chosen, rejected)
    features = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in ours]
    theirs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(RECORDS))])
    batch = PreferenceCollator(tok.pad_token_id)(features)
    assert torch.equal(batch["input_ids"], theirs["input_ids"])
    assert torch.equal(batch["attention_mask"], theirs["attention_mask"])
    assert torch.equal(
        batch["labels"], theirs["input_ids"].masked_fill(theirs["completion_mask"] == 0, IGNORE_INDEX)
    )


@pytest.mark.parametrize(
    "loss_type, label_smoothing", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.1)]
)
def test_dpo_loss_and_rewards_equal_trl(dpo, loss_type, label_smoothing):
    trainer, tok = dpo
    trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
    trainer.label_smoothing = label_smoothing
    trainer._metrics["eval"].clear()
    theirs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(RECORDS))])
    with torch.no_grad(), warnings.catch_warnings():  # TRL reads a name transformers deprecated
        warnings.simplefilter("ignore", FutureWarning)
        trl_loss = trainer._compute_loss(trainer.model, theirs, False)
    logged = {k: v[-1] for k, v in trainer._metrics["eval"].items()}

    settings = {"beta": 0.2, "loss_type": loss_type, "label_smoothing": label_smoothing}
    objective = make_objective("dpo", settings)
    objective.reference_model = trainer.model
    features = [
        {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
        for p, c, r in preference_pairs(RECORDS, tok, "prompt", None)
    ]
    batch = PreferenceCollator(tok.pad_token_id)(features)
    with torch.no_grad():
        out = preference_forward(trainer.model, batch, objective, routes=True)
    pairs = len(RECORDS)
    coef = trainer.model.config.router_aux_loss_coef
    torch.testing.assert_close(out.loss_sum / pairs + coef * out.aux_loss, trl_loss, rtol=1e-5, atol=1e-5)
    assert logged["aux_loss"] == pytest.approx(out.aux_loss.item(), rel=1e-5)
    chosen, rejected, accuracy, margin = (out.metric_sums / pairs).tolist()
    assert chosen == pytest.approx(logged["rewards/chosen"], abs=1e-5)
    assert rejected == pytest.approx(logged["rewards/rejected"], abs=1e-5)
    assert accuracy == pytest.approx(logged["rewards/accuracies"], abs=1e-6)
    assert margin == pytest.approx(logged["rewards/margins"], abs=1e-5)
    assert abs(margin) > 1e-3  # the policy differs from its reference: the rewards measure something


def fixed_logps(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, PairLogps]:
    """Random logits and labels of 3 pairs (6 rows, prompt masked, ragged answers) and their PairLogps."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 10, 32, generator=g)
    labels = torch.randint(0, 32, (6, 10), generator=g)
    labels[:, :3] = IGNORE_INDEX  # prompt
    labels[1, 7:] = IGNORE_INDEX  # a shorter answer (padding)
    labels[4, 9:] = IGNORE_INDEX
    return logits, labels, PairLogps.of(logits, labels)


def test_sum_and_mean_logps_equal_trl():
    from trl.experimental.orpo import ORPOTrainer

    logits, labels, logps = fixed_logps()
    torch.testing.assert_close(
        torch.cat([logps.chosen, logps.rejected]), ORPOTrainer.get_batch_logps(logits, labels)
    )
    torch.testing.assert_close(
        torch.cat(logps.averaged()), ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    )


def test_orpo_odds_ratio_term_and_rewards_equal_trl_and_its_nll_is_the_chosen_answers():
    from trl.experimental.orpo import ORPOTrainer

    _, _, logps = fixed_logps(1)
    lam = 0.25
    objective = make_objective("orpo", {"lambda": lam})
    losses, chosen_rewards, rejected_rewards = objective.losses(logps, None)
    chosen, rejected = logps.averaged()
    trl_self = SimpleNamespace(beta=lam, accelerator=SimpleNamespace(device="cpu"))
    ratio_term, trl_chosen, trl_rejected, _, _ = ORPOTrainer.odds_ratio_loss(trl_self, chosen, rejected)
    # moetune per pair: NLL of the chosen answer (per-token mean) - lambda log sigma(log odds)
    torch.testing.assert_close(losses, -chosen - ratio_term)
    torch.testing.assert_close(chosen_rewards, trl_chosen)
    torch.testing.assert_close(rejected_rewards, trl_rejected)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_loss_and_rewards_equal_trl(label_smoothing):
    from trl.experimental.cpo import CPOTrainer

    _, _, logps = fixed_logps(2)
    objective = make_objective("simpo", {"beta": 2.0, "gamma": 0.7, "label_smoothing": label_smoothing})
    losses, chosen_rewards, rejected_rewards = objective.losses(logps, None)
    trl_self = SimpleNamespace(
        alpha=0.0, beta=2.0, simpo_gamma=0.7, label_smoothing=label_smoothing, loss_type="simpo",
        accelerator=SimpleNamespace(device="cpu"),
    )  # fmt: skip
    trl_losses, trl_chosen, trl_rejected = CPOTrainer.cpo_loss(trl_self, *logps.averaged())
    torch.testing.assert_close(losses, trl_losses)
    torch.testing.assert_close(chosen_rewards, trl_chosen)
    torch.testing.assert_close(rejected_rewards, trl_rejected)


def test_sigmoid_label_smoothing_is_cdpo():
    """TRL 1.16 ignores label_smoothing for sigmoid; moetune applies conservative DPO (cDPO), written out."""
    _, _, policy = fixed_logps(3)
    _, _, reference = fixed_logps(4)
    objective = PreferenceObjective(
        "dpo", beta=0.5, loss_type="sigmoid", label_smoothing=0.2, lam=0.0, gamma=0.0
    )
    losses, _, _ = objective.losses(policy, reference)
    z = 0.5 * ((policy.chosen - reference.chosen) - (policy.rejected - reference.rejected))
    torch.testing.assert_close(losses, -0.8 * F.logsigmoid(z) - 0.2 * F.logsigmoid(-z))


def test_step_loss_normalises_pairs_over_micro_batches_and_the_log_window_averages_rewards():
    """Two micro-batches of 2 and 1 pairs: the step's loss and rewards are means over its 3 pairs."""
    from finetune.losses import ForwardLoss, StepLoss
    from finetune.reporting import LogWindow, StepResult

    one_process = SimpleNamespace(reduce=lambda tensor, op: tensor)
    step = StepLoss(label_tokens=3, micro_batches=2, num_processes=1, aux_coef=0.0, device="cpu")
    first = ForwardLoss(torch.tensor(1.5), None, None, None, metric_sums=torch.tensor([0.4, -0.2, 2.0, 0.6]))
    second = ForwardLoss(torch.tensor(0.3), None, None, None, metric_sums=torch.tensor([0.2, 0.1, 0.0, 0.1]))
    terms = [step.term(first), step.term(second)]
    torch.testing.assert_close(sum(terms), torch.tensor(1.8 / 3))
    assert step.totals(one_process)[0] == pytest.approx(0.6)
    metrics = step.metrics(one_process)
    assert metrics == pytest.approx(
        {"train/rewards/chosen": 0.2, "train/rewards/rejected": -1 / 30, "train/rewards/accuracies": 2 / 3,
         "train/rewards/margins": 0.7 / 3}
    )  # fmt: skip
    window = LogWindow()
    window.add(StepResult(loss=0.6, aux_loss=0.0, grad_norm=1.0, tokens=10, metrics=metrics), 1.0)
    window.add(
        StepResult(
            loss=0.4,
            aux_loss=0.0,
            grad_norm=1.0,
            tokens=10,
            metrics={**metrics, "train/rewards/accuracies": 1.0},
        ),
        1.0,
    )
    assert window.flush()["train/rewards/accuracies"] == pytest.approx((2 / 3 + 1.0) / 2)
