"""Launching several processes: the command each process runs, and the layering it relies on."""

from __future__ import annotations

import ast
from pathlib import Path

from finetune.launch import launch_command

ROOT = Path(__file__).resolve().parents[2]


def test_the_launched_processes_run_the_training_module():
    cmd = launch_command(2, 12345, ["run/recipe.yaml", "--output", "run", "--no-summary"])
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[-6:] == ["-m", "finetune.train", "run/recipe.yaml", "--output", "run", "--no-summary"]
    assert (
        cmd[cmd.index("--num_processes") + 1] == "2" and cmd[cmd.index("--main_process_port") + 1] == "12345"
    )
    assert not any(part.endswith("cli.py") for part in cmd)


def test_nothing_in_finetune_or_adapters_imports_cli():
    importers = []
    for path in sorted((ROOT / "finetune").rglob("*.py")) + sorted((ROOT / "adapters").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            if any(name.split(".")[0] in ("cli", "cli_parser") for name in names):
                importers.append(path.relative_to(ROOT))
    assert not importers, f"only cli.py may import cli / cli_parser: {importers}"
