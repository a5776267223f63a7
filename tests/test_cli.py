"""The command line: init-model, info, generate, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import cli
from finetune.loading import build_empty_model, load_config

REPO = __import__("pathlib").Path(cli.__file__).resolve().parent


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "cli.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )


def test_init_model_info_generate_round_trip(tmp_path, capsys):
    folder = tmp_path / "tiny"
    assert cli.main(["init-model", "--preset", "tiny", "--output", str(folder)]) == 0
    assert (folder / "config.json").exists()
    assert str(folder) in capsys.readouterr().out

    assert cli.main(["info", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    for key in ("model_type", "num_layers", "hidden_size", "num_experts", "top_k", "num_shared_experts",
                "params_total", "params_active", "targets"):  # fmt: skip
        assert key in info
    assert info["model_type"] == "moetune" and info["num_experts"] == 8 and info["top_k"] == 2

    assert cli.main(["generate", str(folder), "--prompt", "def main(", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_info_counts_match_a_direct_count(capsys):
    assert cli.main(["info", "preset:tiny", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    config = load_config("preset:tiny")
    model = build_empty_model(config)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    assert info["params_total"] == total
    assert (
        info["params_active"] == total - experts + experts * config.num_experts_per_tok // config.num_experts
    )
    assert info["targets"]["experts"] > 0 and info["targets"]["attention"] > 0
    assert info["targets"]["router"] == config.num_hidden_layers


def test_info_full_preset_answers_without_materialising(capsys):
    assert cli.main(["info", "preset:full"]) == 0
    table = capsys.readouterr().out
    assert "experts" in table and "128" in table and "params total" in table


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["info", "preset:nope"], "unknown preset 'nope'"),
        (["info", "/no/such/folder"], "does not exist"),
        (["generate", "/no/such/folder", "--prompt", "x"], "does not exist"),
        (["init-model", "--preset", "gigantic", "--output", "/tmp/unused-moetune"], "unknown preset"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(args, fragment, capsys):
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and "\n" not in err and err.startswith("moetune: error:")


def test_not_a_model_folder_in_a_real_process_has_no_traceback(tmp_path):
    (tmp_path / "readme.txt").write_text("not a model")
    result = run_cli("info", str(tmp_path))
    assert result.returncode == 2
    assert "not a model folder" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

    debug = run_cli("--debug", "info", str(tmp_path))
    assert debug.returncode != 0 and "Traceback" in debug.stderr
