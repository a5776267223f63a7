"""Small things a first command trips over: a closed pipe, `info` on an adapter, a missing folder that
looks like a hub id, a misspelt target group."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import cli
from adapters import apply_lora
from adapters.errors import MoetuneError
from tests.helpers import models as tiny_models
from tests.helpers.runs import ROOT, cli_env


def test_a_closed_pipe_ends_quietly_without_a_traceback():
    """`moetune info --json | head -1`: the reader is gone before the output is written (cli.main
    handles it for every command)."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), "info", "preset:tiny", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
        cwd=ROOT,
    )
    proc.stdout.close()  # like `head` after its line: every write from now on hits a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err and err.strip() == ""


def test_info_on_an_adapter_folder_summarises_it_and_names_its_base(tmp_path, capsys):
    base = tmp_path / "base"
    assert cli.main(["init-model", "--preset", "tiny", "--output", str(base)]) == 0
    from finetune.loading import load_model

    model, _ = load_model(str(base))
    apply_lora(model, targets=["attention", "experts"], r=4, alpha=8).save_pretrained(tmp_path / "adapter")
    capsys.readouterr()
    assert cli.main(["info", str(tmp_path / "adapter")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{tmp_path / 'adapter'}: a LoRA adapter (PEFT), not a model")
    assert f"moetune info {base.resolve()}" in out and "4 / 8" in out
    assert cli.main(["info", str(tmp_path / "adapter"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "adapter" and info["base_model"] == str(base.resolve()) and info["r"] == 4
    assert len(info["target_parameters"]) == 4  # gate_up_proj and down_proj in 2 layers


@pytest.mark.parametrize("model", ["no/such-folder", "runs/missing"])
def test_a_missing_folder_says_so_before_the_hub(model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # runs/missing is a path: its first part is a local folder
    assert cli.main(["generate", model, "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"moetune: error: model folder '{model}' does not exist") and "\n" not in err


def test_a_misspelt_target_group_gets_a_did_you_mean():
    model = tiny_models.build("moetune")
    with pytest.raises(MoetuneError, match="did you mean 'experts'"):
        apply_lora(model, targets=["attention", "expert"])
    with pytest.raises(MoetuneError, match="unknown group 'atention'; did you mean 'attention'"):
        apply_lora(model, targets=["experts"], group_overrides={"atention": {"r": 2}})
