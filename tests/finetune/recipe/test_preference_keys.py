"""train.method / train.preference / data.format preference: what the recipe check accepts and refuses."""

from __future__ import annotations

import pytest

from finetune.errors import MoetuneError
from finetune.preference import make_objective
from finetune.recipe import recipe_from_dict


def raw(train: dict | None = None, data: dict | None = None) -> dict:
    return {
        "model": {"name": "preset:tiny"},
        "data": {"train": "synthetic:case-preference", **(data or {})},
        "train": {"max_steps": 1, **(train or {})},
    }


def test_defaults_per_method():
    recipe = recipe_from_dict(raw({"method": "dpo"}, {"format": "preference"}))
    assert recipe.train.method == "dpo" and recipe.train.preference is None
    dpo = make_objective("dpo", None)
    assert (dpo.beta, dpo.loss_type, dpo.label_smoothing, dpo.needs_reference) == (0.1, "sigmoid", 0.0, True)
    simpo = make_objective("simpo", {"gamma": 1.0})
    assert (simpo.beta, simpo.gamma, simpo.needs_reference) == (2.0, 1.0, False)
    assert make_objective("orpo", None).lam == 0.1
    assert make_objective("sft", None) is None
    assert recipe_from_dict(raw()).train.method == "sft"


@pytest.mark.parametrize(
    "train, data, expected",
    [
        ({"method": "dpo"}, {"format": "chat"}, "train.method dpo needs data.format: preference (prompt / chosen / rejected records), not chat"),
        ({}, {"format": "preference"}, "data.format is preference but train.method is sft; set train.method: dpo, orpo or simpo"),
        ({"preference": {"beta": 0.2}}, {}, "train.preference is set but train.method is sft; set train.method: dpo, orpo or simpo"),
        ({"method": "dpo", "preference": {"gamma": 0.5}}, {}, "train.preference.gamma does not apply to train.method dpo; it belongs to train.method simpo"),
        ({"method": "orpo", "preference": {"beta": 0.5}}, {}, "train.preference.beta does not apply to train.method orpo; it belongs to train.method dpo"),
        ({"method": "dpo", "preference": {"betta": 0.5}}, {}, "train.preference.betta does not apply to train.method dpo; did you mean 'beta'?"),
        ({"method": "dpo", "preference": {"loss_type": "kto"}}, {}, "train.preference.loss_type 'kto' is not one of sigmoid, hinge, ipo, robust"),
        ({"method": "dpo", "preference": {"beta": 0}}, {}, "train.preference.beta must be > 0, got 0"),
        ({"method": "simpo", "preference": {"label_smoothing": 0.5}}, {}, "train.preference.label_smoothing must be in [0, 0.5), got 0.5"),
        ({"method": "orpo", "preference": {"lambda": "big"}}, {}, "train.preference.lambda must be a number, got 'big'"),
        ({"method": "dpo"}, {"format": "preference", "packing": True}, "data.packing is not supported with data.format: preference; remove it"),
        ({"method": "ppo"}, {}, "train.method: expected sft | dpo | orpo | simpo, got 'ppo'"),
    ],
)  # fmt: skip
def test_mistakes_are_one_line_errors_naming_the_key_and_the_fix(train, data, expected):
    with pytest.raises(MoetuneError) as info:
        recipe_from_dict(raw(train, data), "r.yaml")
    assert str(info.value) == f"r.yaml: {expected}"
