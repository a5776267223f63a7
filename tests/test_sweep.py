"""`moetune sweep`: every grid point trained once (a finished point is never rerun), a table (CSV +
Markdown) and a PNG of held-out gain vs trainable share, and the smallest budget reaching 92%."""

from __future__ import annotations

import csv
import json

import pytest

import cli
from finetune.errors import MoetuneError
from finetune.evaluation.sweep import SweepPoint, SweepResult, parse_grid, point_overrides
from finetune.recipe import load_recipe
from tests.helpers.runs import write_corpus, write_recipe


def test_the_92_percent_point_is_the_smallest_budget_reaching_it(tmp_path):
    def point(params, gain):
        return SweepPoint({"adapter.r": params}, tmp_path, params, 1000, 5.0, 5.0 - gain)

    result = SweepResult(tmp_path, [point(8, 0.50), point(2, 0.30), point(4, 0.47), point(16, 0.49)])
    assert result.smallest_reaching.trainable_params == 4  # 0.47 >= 0.92 * 0.50; 0.30 is not
    assert SweepResult(tmp_path, [point(2, -0.1)]).smallest_reaching is None


def test_a_threshold_grid_keeps_the_other_esft_keys_of_the_recipe(tmp_path):
    recipe = write_recipe(
        tmp_path,
        write_corpus(tmp_path / "t.jsonl", n=4),
        adapter={"targets": ["attention", "experts"], "experts": {"threshold": 0.2, "metric": "gate_score"}},
    )
    base = load_recipe(str(recipe))
    overrides = point_overrides(base, {"adapter.r": 2, "adapter.experts.threshold": 0.5})
    point = load_recipe(str(recipe), overrides)
    assert point.adapter.r == 2 and point.adapter.experts == {"threshold": 0.5, "metric": "gate_score"}


def test_grids_are_parsed_and_checked():
    assert parse_grid(["adapter.r=2,4", "adapter.experts.threshold=0.5,1.0"]) == [
        ("adapter.r", [2, 4]),
        ("adapter.experts.threshold", [0.5, 1.0]),
    ]
    with pytest.raises(MoetuneError, match="expected SECTION.KEY=V1,V2"):
        parse_grid(["r=2,4"])


def test_sweep_trains_each_point_once_and_resumes(tmp_path, capsys, monkeypatch):
    recipe = write_recipe(
        tmp_path,
        write_corpus(tmp_path / "train.jsonl", n=24),
        data={"max_length": 32},
        train={"max_steps": 2, "save_every": None, "eval_batches": 1},
    )
    out = tmp_path / "sweep"
    assert cli.main(["sweep", str(recipe), "--grid", "adapter.r=1,2", "--output", str(out)]) == 0
    first = capsys.readouterr().out
    assert "sweep of 2 point(s)" in first and "(0 finished earlier, not rerun)" in first
    adapter_r1 = out / "r=1" / "adapter" / "adapter_model.safetensors"
    stamp = adapter_r1.stat().st_mtime_ns

    # Grow the grid: the two finished points are read, only r=4 trains.
    import finetune.train

    trained = []
    real = finetune.train.launch_training
    monkeypatch.setattr(finetune.train, "launch_training", lambda *a, **k: trained.append(k) or real(*a, **k))
    assert cli.main(["sweep", str(recipe), "--grid", "adapter.r=1,2,4", "--output", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [k["output_dir"].name for k in trained] == ["r=4"]
    assert adapter_r1.stat().st_mtime_ns == stamp
    assert [p["reused"] for p in result["points"]] == [True, True, False]

    with open(out / "sweep.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["adapter.r"]) for r in rows] == [1, 2, 4]
    params = [int(r["trainable_params"]) for r in rows]
    assert params[0] < params[1] < params[2]
    for row in rows:
        metrics = json.loads((out / f"r={row['adapter.r']}" / "metrics.json").read_text())
        assert float(row["gain"]) == pytest.approx(metrics["eval_loss_before"] - metrics["eval_loss_after"])
    best = max(float(r["gain"]) for r in rows)
    chosen = result["smallest_reaching_92"]
    assert chosen["gain"] >= 0.92 * best
    assert all(
        int(r["trainable_params"]) >= chosen["trainable_params"]
        for r in rows
        if float(r["gain"]) >= 0.92 * best
    )
    assert "Smallest budget reaching 92%" in (out / "sweep.md").read_text()
    assert (out / "sweep.png").stat().st_size > 0
