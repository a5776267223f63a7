"""Property-based: random jsonl lines through the loader and every format either build examples whose
labels line up with their tokens, or fail with MoetuneError (one line) — never another exception.
Seeded: the same examples on every run."""

from __future__ import annotations

import json
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune.data import prepare_datasets
from finetune.data.formats import IGNORE_INDEX
from finetune.errors import MoetuneError
from finetune.recipe import DataSection
from tests.helpers.tokenizers import tiny_tokenizer

TOKENIZER = tiny_tokenizer()

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", 7]), "content": st.text(max_size=15) | st.none()}
)
_words = st.text(alphabet=string.ascii_letters + " ", min_size=1, max_size=30)
_well_formed = [  # records of each format, as a user's file would hold them
    st.fixed_dictionaries({"text": _words}),
    st.fixed_dictionaries({"prompt": _words, "response": _words}),
    st.fixed_dictionaries({"instruction": _words, "input": st.just("") | _words, "output": _words}),
    st.fixed_dictionaries(
        {"messages": st.just([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])}
    ),
]
_records = st.one_of(
    st.fixed_dictionaries({"text": st.text(max_size=40) | _json_values}),
    st.fixed_dictionaries({"prompt": st.text(max_size=30), "response": st.text(max_size=30) | _json_values}),
    st.fixed_dictionaries({"messages": st.lists(_message, max_size=4) | _json_values}),
    st.dictionaries(
        st.sampled_from(["text", "prompt", "response", "messages", "other"]), _json_values, max_size=3
    ),
)
_lines = st.one_of(
    _records.map(json.dumps),
    _json_values.map(json.dumps),  # valid JSON that may not be an object
    st.text(alphabet=string.printable, max_size=30),  # anything, mostly malformed
)


def _mostly_one_format(pair):
    kind, strays = pair
    return st.lists(kind.map(json.dumps), min_size=2, max_size=6).map(lambda good: good + strays)


_files = st.one_of(
    st.lists(_lines, min_size=1, max_size=8),  # anything
    *[st.lists(kind.map(json.dumps), min_size=1, max_size=8) for kind in _well_formed],  # one format
    st.tuples(st.sampled_from(_well_formed), st.lists(_lines, max_size=2)).flatmap(_mostly_one_format),
)


def test_random_jsonl_either_loads_consistently_or_fails_with_moetune_error(tmp_path):
    """Seeded (derandomize); a real share of the examples must load, so the property cannot pass with
    every example failing."""
    outcomes = []

    @settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(
        lines=_files,
        fmt=st.sampled_from([None, "text", "instruction", "chat"]),
        packing=st.booleans(),
        skip=st.booleans(),
        max_length=st.integers(2, 40),
    )
    def check(lines, fmt, packing, skip, max_length):
        path = tmp_path / "random.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        data = DataSection(
            train=str(path),
            format=fmt,
            packing=packing,
            max_length=max_length,
            on_bad_record="skip" if skip else "fail",
            chat_template="simple",
        )
        try:
            prepared = prepare_datasets(data, TOKENIZER, seed=0)
        except MoetuneError as err:
            assert "\n" not in str(err)
            outcomes.append("refused")
            return
        assert len(prepared.train) > 0
        for row in prepared.train:
            assert len(row["input_ids"]) == len(row["labels"]) == row["length"] <= max_length
            assert any(label != IGNORE_INDEX for label in row["labels"]) or packing
            assert all(label in (IGNORE_INDEX, tok) for label, tok in zip(row["labels"], row["input_ids"]))
            if packing:
                assert len(row["position_ids"]) == row["length"] and row["position_ids"][0] == 0
        outcomes.append("loaded")

    check()
    assert len(outcomes) == 60
    assert outcomes.count("loaded") >= 6, f"only {outcomes.count('loaded')} of 60 random files loaded"
    assert outcomes.count("refused") >= 6
