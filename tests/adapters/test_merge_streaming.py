"""The merge streams: its peak memory, measured in a subprocess, stays near one shard plus the adapter.

The base (Qwen3-MoE layout: per-expert tensors on disk, fused experts in memory) is saved in ~20 MB
shards and weighs several times the bound, so a merge that loaded the model, or even a few shards,
would fail. The subprocess first merges a tiny model so that every module the merge imports is
loaded, then measures its resident memory before the real merge and the peak after it.

The peak is the kernel's high-water mark of the child's own address space (VmHWM, reset through
/proc/self/clear_refs just before the merge). `resource.getrusage(...).ru_maxrss` is reported too but
cannot be the measure: Linux carries the spawning process's peak over exec into it, so under pytest
it starts at the test runner's size.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open

from tests.helpers import models as tiny_models

ROOT = Path(__file__).resolve().parents[2]
SLACK = 32e6  # interpreter, allocator and per-tensor buffers
CHILD = r"""
import json, re, resource, sys
from tests.helpers import models as tiny_models
from peft import LoraConfig, get_peft_model
from adapters.merge import merge_into_base

def status(field):  # bytes
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

warm = sys.argv[2]  # merge a tiny model first: imports and code paths are then all loaded
tiny_models.save("qwen3_moe", warm + "/base")
config = LoraConfig(r=2, target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj"])
get_peft_model(tiny_models.build("qwen3_moe"), config).save_pretrained(warm + "/adapter")
merge_into_base(warm + "/base", warm + "/adapter", warm + "/merged")

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the high-water mark to the current resident size
before = status("VmRSS")
report = str(merge_into_base(sys.argv[3], sys.argv[4], sys.argv[5]))
peak = status("VmHWM")
maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"before": before, "peak": peak, "ru_maxrss": maxrss, "report": report}))
"""


def test_merge_peak_memory_stays_near_one_shard_plus_adapter(tmp_path):
    model = tiny_models.build(
        "qwen3_moe", hidden_size=256, moe_intermediate_size=256, num_experts=16, num_hidden_layers=16,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    )  # fmt: skip
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    model.save_pretrained(base, max_shard_size="20MB")
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])  # fmt: skip
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.01)
    peft_model.save_pretrained(adapter)
    del model, peft_model

    shards = sorted(base.glob("*.safetensors"))
    model_bytes = sum(p.stat().st_size for p in shards)
    largest_shard = max(p.stat().st_size for p in shards)
    adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
    fused = 16 * 2 * 256 * 256 * 4  # one layer's gate_up_proj delta in float32, and its per-expert pieces
    bound = largest_shard + adapter_bytes + 2 * fused + SLACK
    assert len(shards) >= 8 and model_bytes > 2 * bound  # loading the model whole could not pass

    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(ROOT), str(tmp_path / "warm"), str(base), str(adapter), str(tmp_path / "merged")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,  # -c puts the cwd on the path: tests.helpers
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    extra = result["peak"] - result["before"]
    print(
        f"\nmerge of a {model_bytes / 1e6:.0f} MB model in {len(shards)} shards (largest {largest_shard / 1e6:.1f} MB), "
        f"adapter {adapter_bytes / 1e6:.1f} MB: peak {extra / 1e6:.1f} MB above the start, bound {bound / 1e6:.0f} MB"
    )
    assert extra < bound, (
        f"merge peak {extra / 1e6:.0f} MB above its start; bound {bound / 1e6:.0f} MB "
        f"(model {model_bytes / 1e6:.0f} MB, largest shard {largest_shard / 1e6:.0f} MB)"
    )
    assert (
        "LoRA folded into 96 parameters" in result["report"]
    )  # 16 layers x (4 attention + 2 expert tensors)

    merged = sorted((tmp_path / "merged").glob("*.safetensors"))
    assert [p.name for p in merged] == [p.name for p in shards]
    for ours, theirs in zip(merged, shards):
        with safe_open(str(ours), "pt") as a, safe_open(str(theirs), "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys())
