"""Fixtures of the data tests."""

from __future__ import annotations

import pytest

from tests.helpers.tokenizers import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    """The tiny tokenizer (tests/helpers/tokenizers.py), one per test module."""
    return tiny_tokenizer()
