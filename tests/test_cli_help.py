"""`--help`: every option of every subcommand says what it does and its default; every subcommand shows
an example that parses; `export-adapter --format` lists every format; `plan` states its assumptions."""

from __future__ import annotations

import argparse
import json
import shlex

import pytest

import cli
from adapters.export import FORMATS


def _subparsers(parser: argparse.ArgumentParser, prefix: str = ""):
    """(command path, parser) of every subcommand, nested ones included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                path = f"{prefix} {name}".strip()
                yield path, sub
                yield from _subparsers(sub, path)


COMMANDS = dict(_subparsers(cli.build_parser()))
WITH_TOP = {"(top level)": cli.build_parser(), **COMMANDS}


def test_the_walk_sees_every_command():
    assert {"train", "generate", "push", "experts profile", "export-adapter", "plan"} <= set(COMMANDS)


@pytest.mark.parametrize("command", sorted(WITH_TOP))
def test_every_option_has_help_with_its_default(command):
    for action in WITH_TOP[command]._actions:
        if (
            isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
            or action.help == argparse.SUPPRESS
        ):
            continue
        assert action.help, f"{command} {action.dest}: no help text"
        if action.option_strings:
            assert "(default:" in action.help or "(required)" in action.help, (
                f"moetune {command} {action.option_strings[0]}: the help does not state its default: {action.help!r}"
            )
            if action.required:
                assert "(required)" in action.help
            elif action.default not in (None, False, [], argparse.SUPPRESS):
                shown = {str(action.default)}
                if isinstance(action.default, float):
                    shown.add(f"{action.default:g}")
                assert any(f"(default: {v}" in action.help for v in shown), (
                    f"moetune {command} {action.option_strings[0]}: default {action.default!r} not in {action.help!r}"
                )


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_shows_an_example_that_parses(command):
    parser = COMMANDS[command]
    epilog = parser.epilog or ""
    assert epilog.startswith("example:\n  moetune "), f"moetune {command}: no example in --help"
    example = epilog.splitlines()[1].strip()
    assert example.startswith(f"moetune {command.split()[0]}")
    args = cli.build_parser().parse_args(
        shlex.split(example)[1:]
    )  # exits (SystemExit) when it does not parse
    assert args.command == command.split()[0]
    assert "example:\n  moetune" in parser.format_help()  # the line breaks survive formatting


def test_export_adapter_format_help_lists_every_format():
    action = next(a for a in COMMANDS["export-adapter"]._actions if a.dest == "format")
    for fmt in FORMATS:
        assert fmt in action.help, f"--format help does not list {fmt}"


def test_plan_states_its_assumptions_in_the_table_and_the_json(capsys):
    argv = ["plan", "preset:tiny", "--dtype", "float32", "--batch-size", "2", "--seq-len", "512", "--r", "8"]
    assert cli.main([*argv, "--no-checkpointing"]) == 0
    table = capsys.readouterr().out
    assert "assumptions:" in table
    for text in ("float32", "2 x 512 tokens", "r=8", "gradient checkpointing     off", "AdamW"):
        assert text in table, text
    assert cli.main([*argv, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["dtype"], plan["batch_size"], plan["seq_len"], plan["r"]) == ("float32", 2, 512, 8)
    assert plan["gradient_checkpointing"] is True and plan["targets"] == ["attention", "experts"]
