"""Task metrics as pure functions of predictions and references (no model here: see tasks.py).

Each is the mean over examples, in [0, 1]:
- `exact_match`: the generated text equals the reference (both stripped of surrounding whitespace);
- `word_accuracy`: the share of reference words the generation has at the same position (a caption
  that gets colour and shape right but the position wrong scores 2/3 of its words, not 0);
- `macro_f1`: multi-label F1 per class, averaged over the classes (a class never predicted nor present
  scores 0, as scikit-learn's `zero_division=0`);
- `recall_at_1`: paired embeddings (row i of `a` belongs with row i of `b`); the share of rows whose
  nearest neighbour by cosine similarity is their partner, averaged over both directions (a -> b and
  b -> a; chance is 1 / N).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# The metrics a recipe's `eval.metrics` may name; `loss` is the held-out loss the loop always had.
METRICS = ("loss", "exact_match", "word_accuracy", "macro_f1", "recall_at_1")
GENERATION_METRICS = ("exact_match", "word_accuracy")


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference (surrounding whitespace ignored)."""
    _same_length(predictions, references)
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)


def word_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean over examples of (reference words matched at their position) / (reference words)."""
    _same_length(predictions, references)
    total = 0.0
    for prediction, reference in zip(predictions, references):
        said, wanted = prediction.split(), reference.split()
        if wanted:
            total += sum(a == b for a, b in zip(said, wanted)) / len(wanted)
        else:  # an empty reference is matched by an empty prediction only
            total += float(not said)
    return total / len(references)


def macro_f1(predicted: torch.Tensor, gold: torch.Tensor) -> float:
    """Macro-averaged F1 of multi-label predictions: `predicted`, `gold` (N, C) booleans."""
    if predicted.shape != gold.shape or predicted.dim() != 2 or predicted.shape[0] == 0:
        raise ValueError(
            f"macro_f1 needs two (N, C) tensors of one shape, N > 0; got {predicted.shape}, {gold.shape}"
        )
    predicted, gold = predicted.bool(), gold.bool()
    tp = (predicted & gold).sum(0).double()  # (C,)
    f1 = 2 * tp / (predicted.sum(0) + gold.sum(0)).double().clamp(min=1)  # 2TP / (2TP + FP + FN)
    return float(f1.mean())


def recall_at_1(a: torch.Tensor, b: torch.Tensor) -> float:
    """Retrieval recall@1 between paired embeddings `a`, `b` (N, D), mean of a -> b and b -> a."""
    if a.shape != b.shape or a.dim() != 2 or a.shape[0] == 0:
        raise ValueError(
            f"recall_at_1 needs two (N, D) tensors of one shape, N > 0; got {a.shape}, {b.shape}"
        )
    a = torch.nn.functional.normalize(a.double(), dim=-1)
    b = torch.nn.functional.normalize(b.double(), dim=-1)
    sim = a @ b.T  # (N, N): row i = example i of `a` against every `b`
    target = torch.arange(sim.shape[0])
    a_to_b = (sim.argmax(1) == target).double().mean()
    b_to_a = (sim.argmax(0) == target).double().mean()
    return float((a_to_b + b_to_a) / 2)


def _same_length(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references) or not references:
        raise ValueError(
            f"need one prediction per reference and at least one; got {len(predictions)} and {len(references)}"
        )
