"""Shared fixtures and the test environment (offline, one thread); helpers live in tests/helpers/."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tiny models are dominated by per-op overhead; one thread avoids oversubscribing the 2-core CI
# machine (and subprocess tests inherit it through OMP_NUM_THREADS).
torch.set_num_threads(int(os.environ.get("MOETUNE_TEST_THREADS", "1")))
os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("MOETUNE_TEST_THREADS", "1"))


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
    return 0
