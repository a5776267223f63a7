"""The recipe and data rows of the bad-input matrix, end to end through `moetune train`: each mistake
is one line on stderr, exit code 2, no traceback (`--debug` shows it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import cli
from finetune.errors import MoetuneError

REPO = Path(cli.__file__).resolve().parent


def recipe(tmp_path: Path, data: dict, **sections) -> Path:
    body = {
        "model": {"name": "preset:tiny"},
        "adapter": {"targets": ["attention"]},
        "data": {"max_length": 32, **data},
        "train": {"max_steps": 1, "batch_size": 2},
        "output": {"dir": str(tmp_path / "run")},
    }
    for name, extra in sections.items():
        body[name] = {**body.get(name, {}), **extra}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def jsonl(path: Path, lines: list) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def train_error(capsys, path: Path, *extra: str) -> str:
    assert cli.main(["train", str(path), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moetune: error: ") and "Traceback" not in err
    return err


GOOD = [{"text": "def add(a, b):\n    return a + b\n"}] * 4


@pytest.mark.parametrize(
    "row, sections, overrides, expected",
    [
        ("unknown key", {"train": {"lrr": 1e-3}}, [], "r.yaml: unknown key 'train.lrr'; did you mean 'train.lr'?"),
        ("wrong type", {"train": {"batch_size": "two"}}, [], "r.yaml: train.batch_size: expected an integer, got 'two'"),
        ("missing required value", {"adapter": {"targets": []}}, [], "'adapter.targets' is required and empty"),
        ("conflicting values", {"train": {"epochs": 2}}, [], "train.max_steps and train.epochs both set; keep one"),
        ("bad override", {}, ["--set", "data.packing=maybe"], "--set data.packing: expected true or false, got 'maybe'"),
    ],
)  # fmt: skip
def test_recipe_rows(tmp_path, capsys, row, sections, overrides, expected):
    path = recipe(tmp_path, {"train": jsonl(tmp_path / "d.jsonl", GOOD)}, **sections)
    assert expected in train_error(capsys, path, *overrides), row
    assert not (tmp_path / "run").exists()  # refused before anything is written


@pytest.mark.parametrize(
    "row, lines, data, expected",
    [
        ("missing file", None, {"train": "nope/missing.jsonl"}, "data.train: no such file or folder: nope/missing.jsonl"),
        ("malformed JSON on line N", GOOD[:2] + ['{"text": "x",'], {}, "d.jsonl line 3: malformed JSON"),
        ("missing field", GOOD[:2] + [{"body": "x"}], {}, "record 3: missing field 'text' (fields present: body)"),
        ("empty after filtering", [{"text": None, "body": "x"}] * 3, {"on_bad_record": "skip"}, "no examples left after filtering (3 bad record(s) skipped"),
        ("no format fits", [{"body": "x"}] * 3, {}, "cannot infer data.format: the records' fields (body) fit no format"),
        ("every example longer than max length", [{"text": "x = 1\n" * 40}] * 3, {}, "every example is longer than data.max_length=32"),
    ],
)  # fmt: skip
def test_data_rows(tmp_path, capsys, row, lines, data, expected):
    source = jsonl(tmp_path / "d.jsonl", lines) if lines is not None else None
    path = recipe(tmp_path, {"train": source, **data} if source else data)
    assert expected in train_error(capsys, path), row


def test_a_real_process_prints_one_line_and_debug_shows_the_traceback(tmp_path):
    path = recipe(tmp_path, {"train": jsonl(tmp_path / "d.jsonl", GOOD[:1] + ["null"])})
    plain = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), "train", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines() == [
        f"moetune: error: data.train: {tmp_path / 'd.jsonl'} line 2: expected a JSON object per line, got null"
    ]
    with pytest.raises(MoetuneError, match="line 2: expected a JSON object per line"):
        cli.main(["--debug", "train", str(path)])  # --debug: the exception itself, with its traceback
