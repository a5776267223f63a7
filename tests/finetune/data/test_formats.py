"""data.format inferred from the records' fields, Alpaca records, and malformed JSON lines skipped."""

from __future__ import annotations

import logging

import pytest

from finetune.data import prepare_datasets
from finetune.data.formats import IGNORE_INDEX
from finetune.errors import MoetuneError
from finetune.recipe import DataSection
from tests.helpers.runs import jsonl

CONVERSATION = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def prompt_and_answer(tok, row) -> tuple[str, str]:
    """The untrained (prompt) and trained (answer) parts of an example, decoded."""
    first = next(i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX)
    return tok.decode(row["input_ids"][:first]), tok.decode(row["input_ids"][first:])


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"messages": CONVERSATION}, "chat"),
        ({"prompt": "2+2?", "response": "4"}, "instruction"),
        ({"instruction": "Add.", "input": "2+2", "output": "4"}, "instruction"),
        ({"instruction": "Say hi.", "output": "hi"}, "instruction"),
        ({"text": "def f(): pass", "source": "a.py"}, "text"),
    ],
)
def test_the_format_is_inferred_from_the_fields_and_the_choice_is_printed(
    tmp_path, tok, caplog, record, expected
):
    path = jsonl(tmp_path / "d.jsonl", [record] * 3)
    with caplog.at_level(logging.WARNING, logger="moetune.data"):
        prepared = prepare_datasets(DataSection(train=str(path), chat_template="simple"), tok, seed=0)
    assert (
        f"data.format not set; the records' fields ({', '.join(sorted(record))}) fit {expected}"
        in caplog.text
    )
    row = prepared.train[0]
    trained = [label for label in row["labels"] if label != IGNORE_INDEX]
    if expected == "text":
        assert row["labels"] == row["input_ids"]
    else:  # loss on the answer only: the prompt / user turn is masked
        assert 0 < len(trained) < len(row["labels"])


def test_alpaca_input_follows_the_instruction_on_a_new_line_never_dropped(tmp_path, tok):
    records = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
    ]
    path = jsonl(tmp_path / "alpaca.jsonl", records)
    for fmt in (None, "instruction"):  # inferred, or named with the default field names
        train = prepare_datasets(DataSection(train=str(path), format=fmt), tok, seed=0).train
        assert prompt_and_answer(tok, train[0]) == ("Add the numbers.\n2 and 3\n", "5</s>")
        assert prompt_and_answer(tok, train[1]) == ("Say hi.\n", "hi</s>")  # an empty input adds nothing


def test_an_input_field_on_prompt_response_records_is_used_too(tmp_path, tok):
    path = jsonl(tmp_path / "d.jsonl", [{"prompt": "Translate.", "input": "chat", "response": "cat"}])
    train = prepare_datasets(DataSection(train=str(path)), tok, seed=0).train
    assert prompt_and_answer(tok, train[0]) == ("Translate.\nchat\n", "cat</s>")
    path = jsonl(tmp_path / "bad.jsonl", [{"prompt": "Translate.", "input": 3, "response": "cat"}])
    with pytest.raises(MoetuneError, match="record 1: field 'input' must be a string, got int"):
        prepare_datasets(DataSection(train=str(path)), tok, seed=0)


@pytest.mark.parametrize(
    "records, expected",
    [
        ([{"text": "a", "messages": CONVERSATION}], "fit several formats (chat, text)"),
        ([{"image": "a.png", "target": "a cat"}], "the records have media fields (image, target); set data.format: multimodal"),
    ],
)  # fmt: skip
def test_fields_that_fit_no_single_format_ask_for_it(tmp_path, tok, records, expected):
    path = jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(MoetuneError) as info:
        prepare_datasets(DataSection(train=str(path)), tok, seed=0)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_on_bad_record_skip_also_skips_malformed_json_lines(tmp_path, tok, caplog):
    lines = [{"text": "one"}, '{"text": "two"', {"text": "three"}, "null", "[1]", {"text": "four"}]
    path = jsonl(tmp_path / "d.jsonl", lines)
    stops = r"d.jsonl line \d: (malformed JSON|expected a JSON object)"  # the default stops
    with pytest.raises(MoetuneError, match=stops):
        prepare_datasets(DataSection(train=str(path)), tok, seed=0)
    with caplog.at_level(logging.WARNING, logger="moetune.data"):
        prepared = prepare_datasets(DataSection(train=str(path), on_bad_record="skip"), tok, seed=0)
    assert prepared.stats.train.records == 3
    decoded = [tok.decode(row["input_ids"], skip_special_tokens=True) for row in prepared.train]
    assert decoded == ["one", "three", "four"]
    assert (
        f"data.train: {path}: skipped 3 malformed JSON line(s) of 6 (data.on_bad_record: skip); first: line 2"
        in (caplog.text)
    )
    only_bad = jsonl(tmp_path / "bad.jsonl", ["{", "null"])
    with pytest.raises(MoetuneError, match="none of its 2 line"):
        prepare_datasets(DataSection(train=str(only_bad), on_bad_record="skip"), tok, seed=0)
