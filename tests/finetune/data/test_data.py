"""Data pipeline: sources, formats, truncation reports, seeded splits, packing, collators, bad input."""

from __future__ import annotations

import json
import logging
import sys
import types

import datasets
import pytest
import torch

from finetune.data import build_datasets, load_source, make_collator, make_sampler, prepare_datasets
from finetune.data.formats import IGNORE_INDEX
from finetune.errors import MoetuneError
from finetune.recipe import DataSection
from tests.helpers.runs import jsonl
from tests.helpers.tokenizers import tiny_tokenizer


def texts(n: int, words: int = 3):
    return [{"text": " ".join(["fox"] * (words + i % 4)) + f" {i}"} for i in range(n)]


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(MoetuneError) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


# ----------------------------------------------------------------------------- sources


def test_every_structured_source_loads_the_same_records(tmp_path):
    records = [{"text": f"row {i}", "n": i} for i in range(5)]
    jsonl(tmp_path / "a.jsonl", records)
    (tmp_path / "a.json").write_text(json.dumps(records))
    datasets.Dataset.from_list(records).to_csv(str(tmp_path / "a.csv"), index=False)
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(records), "dev": datasets.Dataset.from_list(records[:2])}
    )
    dd.save_to_disk(str(tmp_path / "saved_dict"))
    for name in ("a.jsonl", "a.json", "a.csv", "a.parquet", "saved", "saved_dict"):
        loaded = load_source(str(tmp_path / name), what="data.train")
        assert loaded["text"] == [r["text"] for r in records], name
    assert load_source(f"{tmp_path / 'saved_dict'}:dev", what="data.eval")["n"] == [0, 1]
    both = load_source([str(tmp_path / "a.jsonl"), str(tmp_path / "a.parquet")], what="data.train")
    assert len(both) == 10


def test_text_files_folders_and_globs_are_one_document_per_file(tmp_path, caplog):
    corpus = tmp_path / "corpus"
    (corpus / "pkg").mkdir(parents=True)
    (corpus / "a.py").write_text("def a():\n    return 1\n")
    (corpus / "pkg" / "b.md").write_text("# B\n\ntext\n")
    (corpus / ".hidden.txt").write_text("secret")
    (corpus / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0binary")
    with caplog.at_level(logging.WARNING, logger="moetune.data"):
        folder = load_source(str(corpus), what="data.train")
    assert folder["text"] == ["def a():\n    return 1\n", "# B\n\ntext\n"]
    assert "skipped 1 binary or non-UTF-8 file(s)" in caplog.text and "logo.png" in caplog.text
    assert load_source(str(corpus / "**" / "*.md"), what="data.train")["text"] == ["# B\n\ntext\n"]
    assert load_source(str(corpus / "a.py"), what="data.train")["source"] == [str(corpus / "a.py")]


def test_home_relative_sources_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    jsonl(tmp_path / "h.jsonl", [{"text": "x"}])
    assert load_source("~/h.jsonl", what="data.train")["text"] == ["x"]


def test_stdlib_source_is_the_standard_library_sorted_without_tests():
    docs = load_source("stdlib:python", what="data.train")
    sources = docs["source"]
    assert len(sources) > 100 and sources == sorted(sources)
    assert any(s.endswith("/json/decoder.py") for s in sources)
    assert not any("/test/" in s or "/site-packages/" in s for s in sources)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("missing.jsonl", "data.train: no such file or folder: missing.jsonl"),
        ("nothing/*.jsonl", "the pattern 'nothing/*.jsonl' matches no files"),
        ("stdlib:rust", "unknown special source 'stdlib:rust'"),
        ("someone/some-dataset", "'someone/some-dataset' is not a local file or folder, and the hub is off"),
    ],
)
def test_unreachable_sources_are_one_line_errors(spec, expected, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert expected in one_line_error(load_source, spec, what="data.train")


def test_malformed_json_names_the_file_and_line(tmp_path):
    path = jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, {"text": "b"}, "", '{"text": "c"', {"text": "d"}])
    message = one_line_error(load_source, str(path), what="data.train")
    assert f"data.train: {path} line 4: malformed JSON" in message
    path = jsonl(tmp_path / "list.jsonl", [{"text": "a"}, "[1, 2]"])
    assert f"{path} line 2: expected a JSON object per line, got array" in one_line_error(
        load_source, str(path), what="data.train"
    )
    # pyarrow 26's JSON reader segfaults on a `null` line: it must be refused before the loader runs.
    path = jsonl(tmp_path / "null.jsonl", [{"text": "a"}, "null"])
    assert f"{path} line 2: expected a JSON object per line, got null" in one_line_error(
        load_source, str(path), what="data.train"
    )
    (tmp_path / "nulls.json").write_text('[null, {"text": "a"}]')
    assert "every item of the top-level list must be an object" in one_line_error(
        load_source, str(tmp_path / "nulls.json"), what="data.train"
    )
    (tmp_path / "bad.json").write_text('[{"text": "a"},\n {"text": }]')
    assert "bad.json line 2: malformed JSON" in one_line_error(
        load_source, str(tmp_path / "bad.json"), what="data.eval"
    )
    (tmp_path / "empty.jsonl").write_text("")
    assert "empty.jsonl is empty" in one_line_error(
        load_source, str(tmp_path / "empty.jsonl"), what="data.train"
    )


# ----------------------------------------------------------------------------- formats and labels


def test_text_examples_train_on_every_token_and_end_with_eos(tmp_path, tok):
    path = jsonl(tmp_path / "t.jsonl", texts(4))
    train, evals = build_datasets(DataSection(train=str(path), max_length=64), tok, seed=0)
    assert evals is None and len(train) == 4
    for row in train:
        assert row["labels"] == row["input_ids"] and row["input_ids"][-1] == tok.eos_token_id
        assert row["length"] == len(row["input_ids"])
    assert tok.decode(train[0]["input_ids"], skip_special_tokens=True) == "fox fox fox 0"


def test_instruction_examples_take_loss_on_the_response_only(tmp_path, tok):
    path = jsonl(
        tmp_path / "i.jsonl", [{"q": "What is 12 plus 30?", "a": "42"}, {"q": "Name a fox.", "a": "Quick"}]
    )
    data = DataSection(
        train=str(path), format="instruction", prompt_field="q", response_field="a", separator=" => "
    )
    train, _ = build_datasets(data, tok, seed=0)
    row = train[0]
    trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
    assert tok.decode(trained) == "42</s>"
    assert tok.decode(row["input_ids"]) == "What is 12 plus 30? => 42</s>"
    first_label = next(i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX)
    assert tok.decode(row["input_ids"][:first_label]) == "What is 12 plus 30? => "


def test_chat_dataset_masks_non_assistant_turns(tmp_path, tok):
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = jsonl(tmp_path / "c.jsonl", [{"messages": conv}] * 3)
    train, _ = build_datasets(DataSection(train=str(path), format="chat"), tok, seed=0)
    row = train[0]
    trained = tok.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX])
    assert trained == "hello<|im_end|>\n"


def test_truncation_is_reported_never_silent(tmp_path, tok, caplog):
    records = [{"text": "fox " * 5}, {"text": "fox " * 200}, {"text": "fox " * 300}]
    path = jsonl(tmp_path / "t.jsonl", records)
    with caplog.at_level(logging.WARNING, logger="moetune.data"):
        prepared = prepare_datasets(DataSection(train=str(path), max_length=32), tok, seed=0)
    assert prepared.stats.train.truncated == 2
    assert "data.train: truncated 2 example(s) longer than data.max_length=32" in caplog.text
    assert max(prepared.train["length"]) == 32


def test_instruction_whose_prompt_fills_max_length_is_dropped_and_reported(tmp_path, tok, caplog):
    records = [{"prompt": "fox " * 100, "response": "a"}, {"prompt": "hi", "response": "there"}]
    path = jsonl(tmp_path / "i.jsonl", records)
    with caplog.at_level(logging.WARNING, logger="moetune.data"):
        prepared = prepare_datasets(
            DataSection(train=str(path), format="instruction", max_length=16), tok, seed=0
        )
    assert len(prepared.train) == 1 and prepared.stats.train.no_target == 1
    assert "dropped 1 example(s) whose prompt fills data.max_length=16" in caplog.text


@pytest.mark.parametrize(
    "records, data, expected",
    [
        ([{"text": "a"}, {"body": "b"}], {}, "data.train ({path}) record 2: missing field 'text' (fields present: body); fix the record or set data.on_bad_record: skip"),
        ([{"text": 3}], {}, "record 1: field 'text' must be a string, got int"),
        ([{"prompt": "p"}, {"prompt": "q", "response": "r"}], {"format": "instruction"}, "record 1: missing field 'response' (fields present: prompt)"),
        ([{"text": "a"}, {"messages": [{"role": "user", "content": "x"}]}], {"format": "text"}, "record 2: missing field 'text' (fields present: messages) (its fields fit data.format: chat); fix the record"),
        ([{"prompt": "p", "response": "r"}], {"format": "chat"}, "data.format is chat but no record has the field 'messages' (fields: prompt, response); they fit data.format: instruction"),
        ([{"messages": [{"role": "user", "content": "x"}]}], {"format": "chat"}, "record 1: field 'messages' has no assistant message"),
        ([{"messages": "hi"}], {"format": "chat"}, "field 'messages' must be a non-empty list"),
        ([{"body": "a", "text": None}, {"body": "b"}], {"on_bad_record": "skip"}, "data.train ({path}): no examples left after filtering (2 bad record(s) skipped; first: record 1: missing field 'text'"),
        ([{"body": "a"}, {"body": "b"}], {}, "data.train ({path}): cannot infer data.format: the records' fields (body) fit no format (chat needs 'messages'; instruction needs 'prompt' + 'response' (or Alpaca's 'instruction' + 'output'); text needs 'text'; preference needs 'prompt' + 'chosen' + 'rejected'); set data.format"),
        ([{"text": ""}, {"text": ""}], {}, "no examples left after filtering (2 empty document(s))"),
        ([{"text": "fox " * 50}, {"text": "fox " * 60}], {"max_length": 8}, "every example is longer than data.max_length=8 tokens (the shortest has"),
        ([{"prompt": "fox " * 50, "response": "b"}], {"format": "instruction", "max_length": 8}, "every example is longer than data.max_length=8"),
    ],
)  # fmt: skip
def test_bad_records_are_one_line_errors(tmp_path, tok, records, data, expected):
    path = jsonl(tmp_path / "d.jsonl", records)
    message = one_line_error(build_datasets, DataSection(train=str(path), **data), tok, seed=0)
    assert expected.format(path=path) in message


def test_skipped_records_are_counted_and_reported(tmp_path, tok, caplog):
    path = jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": None}, {"text": "c"}, {"text": 5}])
    with caplog.at_level(logging.WARNING, logger="moetune.data"):
        prepared = prepare_datasets(DataSection(train=str(path), on_bad_record="skip"), tok, seed=0)
    assert len(prepared.train) == 2 and prepared.stats.train.skipped == 2
    assert (
        "data.train: skipped 2 bad record(s) of 4 (data.on_bad_record: skip); first: record 2" in caplog.text
    )


def test_chat_without_any_template_fails_before_reading_records(tmp_path):
    path = jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "assistant", "content": "x"}]}])
    message = one_line_error(
        build_datasets, DataSection(train=str(path), format="chat"), tiny_tokenizer(None), seed=0
    )
    assert "tokenizer has no chat template; set data.chat_template: simple" in message


# ----------------------------------------------------------------------------- splits


def test_eval_fraction_split_is_seeded_disjoint_and_complete(tmp_path, tok):
    path = jsonl(tmp_path / "t.jsonl", texts(40))
    data = DataSection(train=str(path), eval_fraction=0.25)

    def split(seed):
        train, evals = build_datasets(data, tok, seed=seed)
        decode = lambda ds: {tok.decode(r, skip_special_tokens=True) for r in ds["input_ids"]}  # noqa: E731
        return decode(train), decode(evals)

    train, evals = split(0)
    assert len(evals) == 10 and len(train) == 30 and not train & evals
    assert train | evals == {r["text"] for r in texts(40)}
    assert split(0) == (train, evals)
    assert split(1)[1] != evals


def test_separate_eval_file_and_seeded_caps(tmp_path, tok):
    train_path = jsonl(tmp_path / "t.jsonl", texts(30))
    eval_path = jsonl(tmp_path / "e.jsonl", texts(12))
    data = DataSection(train=str(train_path), eval=str(eval_path), max_examples=10, max_eval_examples=4)
    first = prepare_datasets(data, tok, seed=3)
    assert (len(first.train), len(first.eval)) == (10, 4)
    assert (first.stats.train.records, first.stats.eval.records) == (10, 4)
    assert prepare_datasets(data, tok, seed=3).train["input_ids"] == first.train["input_ids"]


def test_eval_fraction_of_too_few_records_is_refused(tmp_path, tok):
    path = jsonl(tmp_path / "t.jsonl", texts(1))
    assert "leaves nothing to train or to evaluate" in one_line_error(
        build_datasets, DataSection(train=str(path), eval_fraction=0.5), tok, seed=0
    )


# ----------------------------------------------------------------------------- packing


def test_packing_fills_rows_restarts_positions_and_never_predicts_across_documents(tmp_path, tok):
    docs = texts(30, words=6)
    path = jsonl(tmp_path / "t.jsonl", docs)
    prepared = prepare_datasets(DataSection(train=str(path), packing=True, max_length=24), tok, seed=0)
    rows = prepared.train
    assert all(n <= 24 for n in rows["length"]) and sum(n == 24 for n in rows["length"]) >= len(rows) - 1
    unpacked, _ = build_datasets(DataSection(train=str(path), max_length=10_000), tok, seed=0)
    assert sum(rows["length"]) == sum(unpacked["length"])  # nothing lost, nothing truncated
    assert [t for r in rows["input_ids"] for t in r] == [t for r in unpacked["input_ids"] for t in r]
    for row in rows:
        for i, pos in enumerate(row["position_ids"]):
            assert pos == (0 if i == 0 else row["position_ids"][i - 1] + 1) or pos == 0
            if pos == 0:
                assert row["labels"][i] == IGNORE_INDEX  # the first token of a document is never a target
            else:
                assert row["labels"][i] == row["input_ids"][i]
    assert prepared.stats.train.split_documents > 0 and prepared.stats.train.truncated == 0
    stats = prepared.stats.train
    assert stats.tokens == sum(rows["length"]) and stats.examples == len(rows)  # counted once each
    assert stats.trained_tokens == sum(label != IGNORE_INDEX for row in rows["labels"] for label in row)


def test_packed_chat_keeps_conversations_whole(tmp_path, tok):
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    path = jsonl(tmp_path / "c.jsonl", [{"messages": conv}] * 10)
    single, _ = build_datasets(DataSection(train=str(path), format="chat"), tok, seed=0)
    packed, _ = build_datasets(
        DataSection(train=str(path), format="chat", packing=True, max_length=64), tok, seed=0
    )
    n = single[0]["length"]
    assert all(length % n == 0 for length in packed["length"]) and sum(packed["length"]) == 10 * n


@pytest.mark.parametrize("attention", ["dense", "hierarchical_sparse"])
def test_packed_batch_gives_each_document_the_logits_it_gets_alone(tmp_path, tok, attention):
    from tests.helpers.models import build

    model = build("moetune", attention_type=attention, vocab_size=len(tok))
    docs = [{"text": "fox " * 9}, {"text": "What is 12 plus 30?"}, {"text": "def add(a, b): return a + b"}]
    path = jsonl(tmp_path / "t.jsonl", docs)
    data = DataSection(train=str(path), packing=True, max_length=64)
    packed = make_collator(data, tok)(list(build_datasets(data, tok, seed=0)[0]))
    assert set(packed) == {"input_ids", "labels", "position_ids"}  # no mask: positions carry the documents
    alone, _ = build_datasets(DataSection(train=str(path)), tok, seed=0)
    with torch.no_grad():
        # use_cache=False, as in training: with a KV cache transformers does not derive packed masks.
        inputs = {k: v for k, v in packed.items() if k != "labels"}
        logits = model(**inputs, use_cache=False).logits[0]
        start = 0
        for row in alone:
            ids = torch.tensor([row["input_ids"]])
            expected = model(input_ids=ids).logits[0]
            torch.testing.assert_close(logits[start : start + ids.shape[1]], expected, atol=1e-4, rtol=1e-4)
            start += ids.shape[1]


# ----------------------------------------------------------------------------- collators and sampler


def test_padding_collator_masks_and_pads(tok):
    collate = make_collator(DataSection(train="x", pad_to_multiple_of=8), tok)
    batch = collate(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "length": 3}, {"input_ids": [9], "labels": [9]}]
    )
    assert batch["input_ids"].shape == (2, 8) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]]
    assert batch["labels"][0].tolist() == [-100, 6, 7] + [-100] * 5
    assert batch["input_ids"][1, 1:].eq(tok.pad_token_id).all()


def test_packed_collator_pads_short_rows_as_one_more_ignored_document(tok):
    collate = make_collator(DataSection(train="x", packing=True), tok)
    batch = collate([
        {"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, 8], "position_ids": [0, 1, 0, 1]},
        {"input_ids": [9, 10], "labels": [-100, 10], "position_ids": [0, 1]},
    ])  # fmt: skip
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 1]]
    assert batch["labels"][1].tolist() == [-100, 10, -100, -100]


def test_length_bucketing_sampler_is_a_seeded_permutation_of_similar_lengths(tmp_path, tok):
    path = jsonl(tmp_path / "t.jsonl", [{"text": "fox " * (1 + (i * 7) % 40)} for i in range(64)])
    data = DataSection(train=str(path), group_by_length=True, max_length=128)
    train, _ = build_datasets(data, tok, seed=0)
    assert make_sampler(DataSection(train="x"), train, batch_size=4, seed=0) is None
    order = list(make_sampler(data, train, batch_size=4, seed=0))
    assert sorted(order) == list(range(64))
    assert order == list(make_sampler(data, train, batch_size=4, seed=0))
    assert order != list(make_sampler(data, train, batch_size=4, seed=1))
    lengths = train["length"]

    def spread(order):  # summed length range inside each batch of 4
        return sum(
            max(lengths[i] for i in order[k : k + 4]) - min(lengths[i] for i in order[k : k + 4])
            for k in range(0, 64, 4)
        )

    shuffled = torch.randperm(64, generator=torch.Generator().manual_seed(0)).tolist()
    assert spread(order) < spread(shuffled) / 2


# ----------------------------------------------------------------------------- multimodal hand-off


def test_multimodal_format_hands_each_split_of_records_to_the_multimodal_module(tmp_path, tok, monkeypatch):
    records = [{"image": f"{i}.png", "text": f"shape {i}"} for i in range(8)]
    path = jsonl(tmp_path / "m.jsonl", records)
    calls = []

    def build_multimodal_dataset(raw, data, processor, *, source):
        calls.append(([row["image"] for row in raw], processor, source))
        return list(raw)

    fake = types.ModuleType("finetune.data.multimodal")
    fake.build_multimodal_dataset = build_multimodal_dataset
    fake.make_multimodal_collator = lambda data, processor: ("mm-collator", data.pad_to_multiple_of)
    monkeypatch.setitem(sys.modules, "finetune.data.multimodal", fake)
    data = DataSection(train=str(path), format="multimodal", eval_fraction=0.25, pad_to_multiple_of=8)
    prepared = prepare_datasets(data, tok, seed=7)
    assert [len(c[0]) for c in calls] == [6, 2] and all(c[1:] == (tok, str(path)) for c in calls)
    assert sorted(calls[0][0] + calls[1][0]) == sorted(r["image"] for r in records)  # a seeded split
    assert prepare_datasets(data, tok, seed=7).eval == prepared.eval
    assert (prepared.stats.train.examples, prepared.stats.eval.examples) == (6, 2)
    assert make_collator(data, tok) == ("mm-collator", 8)
    del fake.build_multimodal_dataset
    assert "finetune.data.multimodal has no build_multimodal_dataset()" in one_line_error(
        build_datasets, data, tok, seed=0
    )


def test_synthetic_multimodal_sources_are_materialised_and_named_by_their_records_file(
    tmp_path, tok, monkeypatch
):
    import finetune.data.synthetic_mm as synthetic_mm

    def materialize(spec, *, what, cache_dir):
        return jsonl(tmp_path / f"{what}-{spec.split(':')[1]}.jsonl", [{"image": "a.png", "target": "x"}] * 4)

    seen = []
    fake = types.ModuleType("finetune.data.multimodal")
    fake.build_multimodal_dataset = lambda raw, data, processor, *, source: seen.append(source) or list(raw)
    monkeypatch.setitem(sys.modules, "finetune.data.multimodal", fake)
    monkeypatch.setattr(synthetic_mm, "materialize", materialize)
    data = DataSection(train="synthetic:shapes", eval="synthetic:tones", format="multimodal")
    prepared = prepare_datasets(data, tok, seed=0)
    assert seen == [str(tmp_path / "data.train-shapes.jsonl"), str(tmp_path / "data.eval-tones.jsonl")]
    assert len(prepared.train) == len(prepared.eval) == 4
