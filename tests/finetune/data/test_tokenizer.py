"""The chat-template rules that depend on the tokenizer (tests/helpers/tokenizers.py builds it)."""

from __future__ import annotations

import pytest

from finetune.data.formats import IGNORE_INDEX, chat_examples, resolve_chat_template
from finetune.errors import MoetuneError
from tests.helpers.tokenizers import CHATML, tiny_tokenizer


def test_tokenizer_round_trips_any_text():
    tok = tiny_tokenizer()
    text = "naïve ünïcödé ✓ and code: x = {'a': [1, 2]}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)


def test_missing_chat_template_is_a_clear_error_and_simple_is_the_documented_default():
    tok = tiny_tokenizer(chat_template=None)
    with pytest.raises(MoetuneError, match="no chat template; set data.chat_template: simple"):
        resolve_chat_template(tok, None)
    template = resolve_chat_template(tok, "simple")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rendered = tok.apply_chat_template(messages, tokenize=False, chat_template=template)
    assert rendered == "<|user|>\nhi\n<|assistant|>\nhello\n"


def test_template_that_rewrites_earlier_turns_is_refused_per_record():
    # Renders the last message differently from the earlier ones: assistant spans cannot be located.
    shifty = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n{% endfor %}"
    tok = tiny_tokenizer(chat_template=shifty)
    record = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    [result] = chat_examples([record], tok, "messages", shifty)
    assert "renders earlier turns differently" in str(result)


def test_chat_labels_cover_exactly_the_assistant_turns_with_their_end_marks():
    tok = tiny_tokenizer()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 12 plus 30?"},
        {"role": "assistant", "content": "42"},
        {"role": "user", "content": "And minus 2?"},
        {"role": "assistant", "content": "40"},
    ]
    [(ids, labels)] = chat_examples([{"messages": messages}], tok, "messages", CHATML)
    assert len(ids) == len(labels)
    trained = tok.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])
    assert trained == "42<|im_end|>\n40<|im_end|>\n"
    assert tok.decode(ids) == tok.apply_chat_template(messages, tokenize=False)
