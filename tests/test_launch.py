"""Launching several processes: the command each process runs, and the layering it relies on."""

from __future__ import annotations

import ast
from pathlib import Path

from finetune.launch import launch_command

ROOT = Path(__file__).resolve().parents[1]


def test_the_launched_processes_run_the_training_module_on_the_resolved_recipe(tmp_path):
    recipe = tmp_path / "run" / "recipe.yaml"
    cmd = launch_command(recipe, tmp_path / "run", num_processes=2, port=12345, resume=True)
    launched = cmd[cmd.index("-m", 2) :]  # after `python -m accelerate.commands.launch ...`
    run = str(tmp_path / "run")
    assert launched == ["-m", "finetune.train", str(recipe), "--output", run, "--no-summary", "--resume"]
    assert (
        cmd[cmd.index("--num_processes") + 1] == "2" and cmd[cmd.index("--main_process_port") + 1] == "12345"
    )


def test_nothing_in_finetune_or_adapters_imports_cli():
    importers = []
    for path in sorted((ROOT / "finetune").rglob("*.py")) + sorted((ROOT / "adapters").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            if any(name == "cli" or name.startswith("cli.") for name in names):
                importers.append(path.relative_to(ROOT))
    assert not importers, f"only cli.py may import cli: {importers}"
