"""`python -m finetune.quickstart`: init, train, evaluate, merge, verify, stage; every artefact exists.

The default test runs the same five steps on a shortened schedule (a few steps, fewer files); the
full quickstart (what `make quickstart` runs) is the `slow` test.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from finetune.errors import MoetuneError
from finetune.quickstart import main, run_quickstart
from tests.helpers.runs import ROOT, SHORT, cli_env


def _check_artefacts(out, report):
    run = out / "run"
    for path in (
        out / "base-model" / "config.json",
        run / "adapter" / "adapter_model.safetensors",
        run / "adapter" / "README.md",
        run / "metrics.json",
        run / "plots" / "loss.png",
        run / "plots" / "expert_load.png",
        run / "recipe.yaml",
        out / "merged" / "config.json",
    ):
        assert path.exists(), path
        assert str(path.parent) in report, f"{path.parent} is not printed"
    assert any((out / "merged").glob("*.safetensors"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["perplexity_after"] < metrics["perplexity_before"]
    assert "% lower" in report
    assert "verify:" in report and "push --dry-run:" in report


def test_quickstart_steps_end_to_end_on_a_short_schedule(tmp_path, capsys):
    out, record = tmp_path / "qs", tmp_path / "results" / "quickstart.txt"
    args = ["--output", str(out), "--record", str(record)] + [f"--set={item}" for item in SHORT]
    assert main(args) == 0
    report = capsys.readouterr().out
    _check_artefacts(out, report)
    # --record stores the printed report with the command, date and machine it came from
    stored = record.read_text()
    assert stored.startswith(f"# python -m finetune.quickstart {' '.join(args)}\n# date: ")
    assert "CPUs, torch threads" in stored
    summary = next(line for line in report.splitlines() if line.startswith("quickstart done in"))
    assert summary in stored and "held-out perplexity" in summary


def test_quickstart_refuses_a_folder_that_is_not_empty(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(MoetuneError, match="not empty"):
        run_quickstart(tmp_path, SHORT)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


@pytest.mark.slow
def test_full_quickstart_as_make_runs_it(tmp_path):
    out = tmp_path / "qs"
    done = subprocess.run(
        [sys.executable, "-m", "finetune.quickstart", "--output", str(out)],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    _check_artefacts(out, done.stdout)
