"""The expert-load plot labels every expert (every k-th on wide models); the profile heatmap outlines
the selected experts."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

from finetune.evaluate import profile_figure
from finetune.plots import MAX_EXPERT_TICKS, expert_load_figure, expert_ticks


def _rows(layers: int, experts: int) -> list[list[float]]:
    return [[(e + layer) % 5 / 10 for e in range(experts)] for layer in range(layers)]


@pytest.mark.parametrize("experts, step", [(8, 1), (MAX_EXPERT_TICKS, 1), (64, 2), (128, 4), (160, 5)])
def test_expert_ticks_label_every_expert_or_every_kth(experts, step):
    ticks = expert_ticks(experts)
    assert ticks == list(range(0, experts, step)) and len(ticks) <= MAX_EXPERT_TICKS


@pytest.mark.parametrize("experts", [8, 128])
def test_every_panel_of_the_expert_load_plot_labels_its_experts(experts):
    fig = expert_load_figure(_rows(2, experts), _rows(2, experts))
    try:
        heatmaps = [ax for ax in fig.axes if ax.get_ylabel() == "MoE layer"]
        assert len(heatmaps) == 3
        for ax in heatmaps:
            labels = [t.get_text() for t in ax.get_xticklabels()]
            assert labels == [str(e) for e in expert_ticks(experts)]
            assert ax.get_xlabel() == (
                "expert" if experts <= MAX_EXPERT_TICKS else "expert (a label every 4)"
            )
    finally:
        plt.close(fig)


def test_the_profile_heatmap_outlines_exactly_the_selected_experts():
    stats = {"token_ratio": _rows(3, 8), "top_k": 2, "layers": [1, 2, 3]}
    selection = {1: [0, 5], 3: [7]}
    fig = profile_figure(stats, selection, "profile")
    try:
        (ax,) = [a for a in fig.axes if a.get_ylabel() == "layer"]
        (markers,) = ax.collections
        assert sorted(map(tuple, markers.get_offsets().tolist())) == [(0, 0), (5, 0), (7, 2)]  # (expert, row)
        assert [t.get_text() for t in ax.get_xticklabels()] == [str(e) for e in range(8)]
        assert "selected (3)" in [t.get_text() for t in ax.get_legend().get_texts()]
    finally:
        plt.close(fig)
