"""The README's first-hour path as one test, through the real entry points in process:
quickstart (short schedule) -> generate --adapter -> merge --verify -> push --dry-run."""

from __future__ import annotations

import cli
from finetune import quickstart
from tests.helpers.runs import SHORT


def test_quickstart_then_generate_merge_and_push_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "qs"
    argv = ["--output", str(out)]
    for override in SHORT:
        argv += ["--set", override]
    assert quickstart.main(argv) == 0
    base, adapter = out / "base-model", out / "run" / "adapter"
    capsys.readouterr()

    assert (
        cli.main(
            ["generate", str(base), "--adapter", str(adapter), "--prompt", "def ", "--max-new-tokens", "8"]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert captured.out.strip() and "error" not in captured.err

    merged = tmp_path / "merged"
    assert cli.main(["merge", str(base), "--adapter", str(adapter), "--output", str(merged), "--verify"]) == 0
    report = capsys.readouterr().out
    assert "verify-merge passed" in report and (merged / "config.json").is_file()

    assert cli.main(["generate", str(merged), "--prompt", "def ", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip()

    assert cli.main(["push", str(adapter), "--repo-id", "you/moe-quickstart", "--dry-run"]) == 0
    staged = capsys.readouterr().out
    assert "dry run: would upload" in staged and "adapter_model.safetensors" in staged
    assert "model card: valid" in staged
