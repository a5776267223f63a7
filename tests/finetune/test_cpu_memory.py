"""finetune.cpu_memory: `import finetune` caps the CPU matmul caches before torch loads (defaults only:
the user's environment wins; MOETUNE_CPU_MEMORY=keep switches it off)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

VARIABLES = (
    "LRU_CACHE_CAPACITY",
    "ONEDNN_PRIMITIVE_CACHE_CAPACITY",
    "MOETUNE_CPU_MEMORY",
)
ROOT = Path(__file__).resolve().parents[2]


def _run(code: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


SEEN_AFTER_IMPORT = """
import json, os, sys

class SeeTorchLoad:  # records the cache setting at the moment torch is first imported
    seen = "torch not imported"
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and SeeTorchLoad.seen == "torch not imported":
            SeeTorchLoad.seen = os.environ.get("LRU_CACHE_CAPACITY")
        return None

sys.meta_path.insert(0, SeeTorchLoad())
import finetune
names = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")
print(json.dumps({k: os.environ.get(k) for k in names} | {"when torch loaded": SeeTorchLoad.seen}))
"""


def test_import_finetune_caps_both_matmul_caches_before_torch_loads():
    seen = _run(SEEN_AFTER_IMPORT)
    assert seen == {
        "LRU_CACHE_CAPACITY": "64",
        "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64",
        "when torch loaded": "64",
    }


def test_the_users_environment_wins_and_keep_switches_the_settings_off():
    assert _run(SEEN_AFTER_IMPORT, LRU_CACHE_CAPACITY="7")["LRU_CACHE_CAPACITY"] == "7"
    off = _run(SEEN_AFTER_IMPORT, MOETUNE_CPU_MEMORY="keep")
    assert off["LRU_CACHE_CAPACITY"] is None and off["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] is None
