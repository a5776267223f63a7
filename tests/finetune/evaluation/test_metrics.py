"""The metric functions against cases computed by hand."""

from __future__ import annotations

import pytest
import torch

from finetune.evaluation import metrics as m


def test_exact_match_counts_whole_strings_and_ignores_surrounding_whitespace():
    predictions = ["a red circle", " a blue square\n", "a red circle at", ""]
    references = ["a red circle", "a blue square", "a red circle", "x"]
    assert m.exact_match(predictions, references) == pytest.approx(2 / 4)


def test_word_accuracy_gives_credit_per_word_at_its_position():
    predictions = ["a red circle at the left", "a blue", "blue a square", ""]
    references = ["a red square at the left", "a blue square", "a blue square", ""]
    # 5/6 (square wrong), 2/3 (missing word), 1/3 (only "square" in place), empty == empty: 1
    assert m.word_accuracy(predictions, references) == pytest.approx((5 / 6 + 2 / 3 + 1 / 3 + 1) / 4)


def test_text_metrics_refuse_mismatched_lists():
    with pytest.raises(ValueError):
        m.exact_match(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        m.word_accuracy([], [])


def test_macro_f1_by_hand():
    predicted = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 0, 0], [1, 0, 0]]).bool()
    gold = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 0, 1]]).bool()
    # class 0: TP 2, FP 1, FN 0 -> 4/5; class 1: TP 1 -> 1; class 2: TP 0, FP 1, FN 1 -> 0
    assert m.macro_f1(predicted, gold) == pytest.approx((4 / 5 + 1 + 0) / 3)


def test_macro_f1_of_a_class_neither_present_nor_predicted_is_zero():
    predicted = torch.tensor([[1, 0], [0, 0]]).bool()
    gold = torch.tensor([[1, 0], [0, 0]]).bool()
    assert m.macro_f1(predicted, gold) == pytest.approx(0.5)


def test_recall_at_1_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.1], [1.0, 0.0], [1.0, 1.2]])
    # a -> b: row 0 nearest b0 (cos .9988 vs 1.0? b1 is exactly (1,0)) -> b1: miss; row 1 -> b2: miss
    # (b2 has the largest y share); row 2 -> b2: hit. a -> b = 1/3.
    # b -> a: b0 -> a0 hit; b1 -> a0 miss; b2 -> a2 hit. b -> a = 2/3. Mean 1/2.
    assert m.recall_at_1(a, b) == pytest.approx(0.5)


def test_recall_at_1_is_one_for_identical_and_scale_free():
    a = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    assert m.recall_at_1(a, 3.0 * a) == 1.0
    assert m.recall_at_1(a, a.roll(1, dims=0)) < 1.0
