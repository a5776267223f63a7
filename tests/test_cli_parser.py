"""cli.py and cli_parser.py agree: every subcommand runs the handler of its name, and the CLI's copy of
the quantization methods (kept literal so that `moetune --help` imports no torch) is the library's."""

from __future__ import annotations

import shlex

import pytest

import cli
import cli_parser


@pytest.mark.parametrize("command", sorted(cli.HANDLERS))
def test_each_subcommand_runs_the_handler_of_its_name(command):
    args = cli.build_parser().parse_args(shlex.split(cli_parser.EXAMPLES[command])[1:])
    assert args.handler is cli.HANDLERS[command]


def test_every_subcommand_has_a_handler():
    groups = {"experts"}  # a group of subcommands runs nothing itself
    declared = {name for name in cli_parser.EXAMPLES if name not in groups}
    assert declared == set(cli.HANDLERS)


def test_the_quantize_choices_are_the_library_methods():
    from finetune.quantization import METHODS

    assert cli_parser.QUANTIZE_METHODS == METHODS
