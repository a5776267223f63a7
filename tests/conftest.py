"""Shared fixtures: a seed, a tmp folder, and the tiny model families (see tiny_models.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

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
