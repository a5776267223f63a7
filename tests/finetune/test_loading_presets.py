"""`preset:NAME` is one model everywhere: the same weights on every load, whatever the caller's RNG,
and loading it neither reads nor advances that RNG (a training run's seed stays in charge)."""

from __future__ import annotations

import torch

from finetune import load_model
from finetune.loading import init_model


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_preset_has_the_same_weights_whatever_the_global_seed():
    torch.manual_seed(1)
    first = _weights(load_model("preset:tiny")[0])
    torch.manual_seed(12345)
    torch.rand(100)  # a caller that already drew numbers
    second = _weights(load_model("preset:tiny")[0])
    assert first.keys() == second.keys()
    for key, value in first.items():
        assert torch.equal(value, second[key]), key
    # not trivially equal: the weights are random, not constant
    assert first["lm_head.weight"].std() > 0


def test_loading_a_preset_leaves_the_callers_rng_where_it_was():
    torch.manual_seed(7)
    expected = torch.rand(5)
    torch.manual_seed(7)
    load_model("preset:tiny")
    assert torch.equal(torch.rand(5), expected)


def test_init_model_default_seed_writes_the_preset_and_leaves_the_rng_alone(tmp_path):
    torch.manual_seed(3)
    expected = torch.rand(5)
    torch.manual_seed(3)
    folder = init_model("tiny", tmp_path / "m").folder
    assert torch.equal(torch.rand(5), expected)
    saved = _weights(load_model(str(folder))[0])
    preset = _weights(load_model("preset:tiny")[0])
    assert saved.keys() == preset.keys()
    for key, value in preset.items():
        assert torch.equal(saved[key], value), key
    other = _weights(load_model(str(init_model("tiny", tmp_path / "m1", seed=1).folder))[0])
    assert not torch.equal(other["lm_head.weight"], preset["lm_head.weight"])
