"""data.format preference: records -> pairs of token ids, chat prompts, truncation, bad records, batches."""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from finetune.accelerator import reset_state
from finetune.data import build_datasets, make_collator, prepare_datasets
from finetune.data.formats import IGNORE_INDEX
from finetune.data.preference import preference_pairs, truncate_pair
from finetune.data.synthetic_text import case_preference
from finetune.errors import MoetuneError
from finetune.recipe import DataSection
from tests.helpers.models import build
from tests.helpers.tokenizers import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


PAIRS = [
    {"prompt": "What is 12 plus 30?", "chosen": " 42", "rejected": " 41"},
    {"prompt": "def add(a, b):", "chosen": "\n    return a + b", "rejected": "\n    pass"},
]
CHAT = [
    {
        "prompt": [{"role": "user", "content": "What is 12 plus 30?"}],
        "chosen": [{"role": "assistant", "content": "42"}],
        "rejected": [{"role": "assistant", "content": "41 or so"}],
    },
    {"prompt": [{"role": "user", "content": "def add(a, b):"}], "chosen": "return a + b", "rejected": "pass"},
]


def test_plain_pairs_become_prompt_and_answers_with_eos_and_batches_of_chosen_then_rejected(tmp_path, tok):
    path = jsonl(tmp_path / "p.jsonl", PAIRS)
    train, _ = build_datasets(DataSection(train=str(path)), tok, seed=0)  # format inferred from the fields
    assert train.column_names == ["prompt_ids", "chosen_ids", "rejected_ids", "length"]
    row = train[0]
    assert tok.decode(row["prompt_ids"]) == "What is 12 plus 30?"
    assert row["chosen_ids"][-1] == row["rejected_ids"][-1] == tok.eos_token_id
    assert tok.decode(row["chosen_ids"][:-1]) == " 42"
    batch = make_collator(DataSection(train=str(path), format="preference"), tok)([train[0], train[1]])
    assert batch["input_ids"].shape[0] == 4  # 2 chosen rows, then 2 rejected rows
    for i, (row, answer) in enumerate([(train[0], "chosen"), (train[1], "chosen"), (train[0], "rejected")]):
        n_prompt, n_answer = len(row["prompt_ids"]), len(row[f"{answer}_ids"])
        assert batch["input_ids"][i, :n_prompt].tolist() == row["prompt_ids"]
        assert (batch["labels"][i, :n_prompt] == IGNORE_INDEX).all()
        assert batch["labels"][i, n_prompt : n_prompt + n_answer].tolist() == row[f"{answer}_ids"]
        assert (batch["labels"][i, n_prompt + n_answer :] == IGNORE_INDEX).all()
        assert batch["attention_mask"][i].sum() == n_prompt + n_answer


def test_chat_pairs_equal_trl_tokenization(tok):
    """TRL applies the tokenizer's chat template to the prompt (with the generation prompt) and to the
    prompt + answer; a plain-string answer is one assistant message (TRL needs messages there)."""
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    as_messages = [
        {
            **r,
            **{
                k: [{"role": "assistant", "content": r[k]}]
                for k in ("chosen", "rejected")
                if isinstance(r[k], str)
            },
        }
        for r in CHAT
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(
            model=build("moetune", vocab_size=len(tok)),
            args=DPOConfig(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True, max_length=64),
            train_dataset=Dataset.from_list(as_messages),
            processing_class=tok,
            peft_config=LoraConfig(r=2, target_modules=["q_proj"]),
        )
    reset_state()  # the Trainer's Accelerator state must not leak into later runs in this process
    ours = preference_pairs(CHAT, tok, "prompt", tok.chat_template)
    for row, pair in zip(trainer.train_dataset, ours):
        assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == pair
    assert tok.decode(ours[0][0]).endswith("<|im_start|>assistant\n")


def test_chat_pairs_through_the_pipeline_use_the_recipe_template(tmp_path):
    path = jsonl(tmp_path / "c.jsonl", CHAT)
    data = DataSection(train=str(path), format="preference", chat_template="simple")
    train, _ = build_datasets(data, tiny_tokenizer(None), seed=0)  # the tokenizer has no template of its own
    assert tiny_tokenizer(None).decode(train[0]["prompt_ids"]).endswith("<|assistant|>\n")


def test_truncation_cuts_the_prompt_start_first_then_the_answers_end():
    pair = (list(range(10)), [100, 101, 102], [200, 201])
    assert truncate_pair(pair, 13) == (pair, False)
    assert truncate_pair(pair, 8) == (([5, 6, 7, 8, 9], [100, 101, 102], [200, 201]), True)
    # the prompt keeps half of max_length; the longer answer is then cut at its end
    assert truncate_pair((list(range(10)), list(range(100, 110)), [200]), 8) == (
        ([6, 7, 8, 9], [100, 101, 102, 103], [200]),
        True,
    )


def test_truncated_pairs_are_counted_and_reported(tmp_path, tok, caplog):
    short = {"prompt": "p", "chosen": "a", "rejected": "b"}
    path = jsonl(tmp_path / "p.jsonl", [{"prompt": "fox " * 40, "chosen": "a b c", "rejected": "d"}, short])
    with caplog.at_level(logging.WARNING, logger="moetune.data"):
        prepared = prepare_datasets(DataSection(train=str(path), max_length=16), tok, seed=0)
    assert prepared.stats.train.truncated == 1
    assert max(prepared.train["length"]) <= 16
    assert "truncated 1 example(s) longer than data.max_length=16" in caplog.text


@pytest.mark.parametrize(
    "records, expected",
    [
        ([PAIRS[0], {"prompt": "p", "chosen": "a"}], "record 2: missing field 'rejected' (fields present: prompt, chosen)"),
        ([{"prompt": "p", "chosen": "a", "rejected": 3}], "record 1: field 'rejected' must be a string when the prompt is, got int"),
        ([{"prompt": 5, "chosen": "a", "rejected": "b"}], "field 'prompt' must be a string or a list of messages, got int"),
        ([{"prompt": "p", "chosen": "same", "rejected": "same"}], "record 1: 'chosen' and 'rejected' are the same: nothing to prefer"),
        ([{"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}], "prompt[0] must be an object with string 'role' and 'content'"),
        ([{"prompt": [{"role": "user", "content": "q"}], "chosen": [], "rejected": "b"}], "field 'chosen' must be a non-empty list of {role, content} messages"),
    ],
)  # fmt: skip
def test_bad_preference_records_are_one_line_errors(tmp_path, tok, records, expected):
    path = jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(MoetuneError) as info:
        build_datasets(DataSection(train=str(path), format="preference", chat_template="simple"), tok, seed=0)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(f"data.train ({path}) record ")
    assert expected in str(info.value)
    assert str(info.value).endswith("fix the record or set data.on_bad_record: skip")


def test_bad_preference_records_are_skipped_and_counted(tmp_path, tok):
    records = [*PAIRS, {"prompt": "p", "chosen": "x", "rejected": "x"}, {"prompt": "p", "chosen": "a"}]
    path = jsonl(tmp_path / "d.jsonl", records)
    prepared = prepare_datasets(
        DataSection(train=str(path), format="preference", on_bad_record="skip"), tok, seed=0
    )
    assert len(prepared.train) == 2 and prepared.stats.train.skipped == 2


def test_preference_format_on_other_records_names_the_fields(tmp_path, tok):
    path = jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}])
    with pytest.raises(MoetuneError, match="data.format is preference but no record has the field 'chosen'.*"
                       "they fit data.format: instruction"):  # fmt: skip
        build_datasets(DataSection(train=str(path), format="preference"), tok, seed=0)


def test_synthetic_case_preference_is_deterministic_and_asks_for_the_chosen_case():
    records = case_preference(50, seed=3)
    assert records == case_preference(50, seed=3) and records != case_preference(50, seed=4)
    for r in records:
        asked_upper = "upper case" in r["prompt"]
        assert r["chosen"] == (r["chosen"].upper() if asked_upper else r["chosen"].lower())
        assert r["rejected"] != r["chosen"] and r["rejected"].lower() == r["chosen"].lower()
    assert 10 < sum("upper case" in r["prompt"] for r in records) < 40  # both cases win
    data = DataSection(train="synthetic:case-preference:20", eval="synthetic:case-preference")
    train, evals = build_datasets(data, tiny_tokenizer(), seed=0)
    assert len(train) == 20 and len(evals) == 200  # eval: its own default size and seed


def test_a_bad_synthetic_spec_is_a_one_line_error(tok):
    with pytest.raises(
        MoetuneError, match=r"data.train: 'synthetic:nope': write synthetic:KIND\[:N\[:SEED\]\]"
    ):
        build_datasets(DataSection(train="synthetic:nope"), tok, seed=0)


def test_collated_batch_is_padded_to_a_multiple(tmp_path, tok):
    path = jsonl(tmp_path / "p.jsonl", PAIRS)
    data = DataSection(train=str(path), format="preference", pad_to_multiple_of=8)
    train, _ = build_datasets(data, tok, seed=0)
    batch = make_collator(data, tok)([train[0], train[1]])
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["input_ids"].dtype == torch.long


def test_the_docs_row_of_the_text_synthetic_source_names_its_kinds_and_defaults():
    from finetune.data.synthetic_text import DEFAULT_SEEDS, DEFAULT_SIZES, KINDS

    doc = (Path(__file__).resolve().parents[3] / "docs" / "recipes-and-data.md").read_text()
    (row,) = [line for line in doc.splitlines() if line.startswith("| `synthetic:case-preference")]
    assert KINDS == ("case-preference",)
    assert (
        f"N = {DEFAULT_SIZES['train']} / {DEFAULT_SIZES['eval']}, SEED {DEFAULT_SEEDS['train']} / {DEFAULT_SEEDS['eval']}"
        in row
    )
