"""Property-based: random jsonl lines through the loader and every format either build examples whose
labels line up with their tokens, or fail with MoetuneError (one line) — never another exception."""

from __future__ import annotations

import json
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_data_tokenizer import tiny_tokenizer

from finetune.data import prepare_datasets
from finetune.data.formats import IGNORE_INDEX
from finetune.errors import MoetuneError
from finetune.recipe import DataSection

TOKENIZER = tiny_tokenizer()

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", 7]), "content": st.text(max_size=15) | st.none()}
)
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


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    lines=st.lists(_lines, min_size=1, max_size=8),
    fmt=st.sampled_from(["text", "instruction", "chat"]),
    packing=st.booleans(),
    skip=st.booleans(),
    max_length=st.integers(2, 40),
)
def test_random_jsonl_either_loads_consistently_or_fails_with_moetune_error(
    tmp_path_factory, lines, fmt, packing, skip, max_length
):
    path = tmp_path_factory.mktemp("d") / "random.jsonl"
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
        return
    assert len(prepared.train) > 0
    for row in prepared.train:
        assert len(row["input_ids"]) == len(row["labels"]) == row["length"] <= max_length
        assert any(label != IGNORE_INDEX for label in row["labels"]) or packing
        assert all(label in (IGNORE_INDEX, tok) for label, tok in zip(row["labels"], row["input_ids"]))
        if packing:
            assert len(row["position_ids"]) == row["length"] and row["position_ids"][0] == 0
