"""finetune.cpu_memory: `import finetune` caps the CPU matmul caches and fixes glibc's mmap threshold
(defaults only: the user's environment wins; MOETUNE_CPU_MEMORY=keep switches it off)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

VARIABLES = (
    "LRU_CACHE_CAPACITY",
    "ONEDNN_PRIMITIVE_CACHE_CAPACITY",
    "MALLOC_MMAP_THRESHOLD_",
    "MOETUNE_CPU_MEMORY",
)
ROOT = Path(__file__).resolve().parents[2]
GLIBC = platform.libc_ver()[0] == "glibc"


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


# glibc raises its mmap threshold to the size of a freed mmapped block, so a later, smaller block comes
# from the heap; with the threshold fixed, it is mapped on its own (and given back when freed).
MAPPED_AFTER_A_FREE = """
import ctypes, json, os
if os.environ.get("IMPORT") == "1":  # the module alone (standard library only), not the package
    import importlib.util
    spec = importlib.util.spec_from_file_location("cpu_memory", "finetune/cpu_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.apply()
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = Info
libc.free(libc.malloc(4 << 20))  # a 4 MiB block, mapped, then freed
before = libc.mallinfo2().hblkhd
block = libc.malloc(1 << 20)  # 1 MiB: mapped only if the threshold did not move
print(json.dumps({"mapped": libc.mallinfo2().hblkhd - before >= 1 << 20}))
"""


@pytest.mark.skipif(
    not GLIBC, reason="the mmap threshold is a glibc setting; elsewhere apply() leaves malloc alone"
)
def test_the_mmap_threshold_stays_fixed_after_a_large_block_is_freed():
    assert _run(MAPPED_AFTER_A_FREE, IMPORT="0")["mapped"] is False  # glibc's dynamic threshold
    assert _run(MAPPED_AFTER_A_FREE, IMPORT="1")["mapped"] is True
    assert _run(MAPPED_AFTER_A_FREE, IMPORT="1", MALLOC_MMAP_THRESHOLD_="8388608")["mapped"] is False
