"""Hierarchical sparse attention vs dense causal sdpa: forward + backward time and peak memory, as ratios.

This is the attention alone on one unpadded document (the fused CPU fast path), timed as process CPU
time with one thread by default: the kernel's compute cost. What a training step costs a user (wall
time, 2 threads, a whole decoder layer with its MoE, packed input too) is benchmarks/sparse_decoder.py.

Both sides are the built-in model's attention modules at the same shape (batch 1, 8 heads, 8 KV heads,
head dim 64, hidden 512, so q/k/v/o projections are included on both sides and cost the same): the dense
`MoetuneAttention` dispatched to torch's `scaled_dot_product_attention(is_causal=True)`, and
`HierarchicalSparseAttention` (local window 8, global ratio 0.1 = blocks of 10 tokens).

Time: one process per length holds every configuration and alternates their steps (forward, then
backward from a fixed random output gradient), so background load hits all alike; the medians of the repeats are reported, both as
process CPU time (the headline: with one torch thread, the default, it is the compute cost and barely
moves when other jobs share the machine) and as wall-clock time.
Peak memory: a fresh subprocess per (level, module, length, dtype) builds the module and its inputs, runs
one warm-up step, resets the kernel's resident-set high-water mark (`echo 5 > /proc/self/clear_refs`,
Linux), runs one forward + backward and reads `VmHWM` from /proc/self/status: the step's peak resident
memory above what was resident before it (weights, inputs, libraries). The children run with
MALLOC_MMAP_THRESHOLD_=65536 so that glibc returns every freed buffer to the kernel at once and the
resident size follows the live tensors (not the allocator's caching).

    .venv/bin/python benchmarks/sparse_attention.py            # 2048, 8192, 20480 tokens (12-25 min, 2 cores)
    .venv/bin/python benchmarks/sparse_attention.py --quick    # 1024, 2048 (seconds)

Writes benchmarks/results/sparse_attention.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from finetune.modeling import preset_config  # noqa: E402
from finetune.modeling.modeling_moetune import MoetuneAttention, MoetuneRotaryEmbedding  # noqa: E402
from finetune.modeling.sparse_attention import HierarchicalSparseAttention  # noqa: E402
from finetune.modeling.sparse_attention_kernels import Layout  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SHAPE = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=8, head_dim=64)


def build(level: str, kind: str, length: int, dtype: torch.dtype):
    """A function running one forward + backward of `kind` ("dense" / "sparse") at `level`.

    level "attention": the attention proper, from rotary q / k / v (and the gate logits) to the per-head
    output: sdpa(is_causal=True) vs `HierarchicalSparseAttention.attend`. level "module": the whole
    attention module, hidden states in and out, q / k / v / o projections (and the gate) included.
    """
    config = preset_config(
        "small", **SHAPE, attention_type="hierarchical_sparse", local_window=8, global_ratio=0.1,
        max_position_embeddings=max(length, 8192),
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    cls = MoetuneAttention if kind == "dense" else HierarchicalSparseAttention
    module = cls(config, layer_idx=0).to(dtype)
    heads, dim = SHAPE["num_attention_heads"], SHAPE["head_dim"]
    position_ids = torch.arange(length)[None]
    if level == "module":
        hidden = torch.randn(1, length, config.hidden_size, dtype=dtype, requires_grad=True)
        rope = MoetuneRotaryEmbedding(config)(hidden, position_ids)
        inputs = [hidden]

        def forward() -> torch.Tensor:
            return module(hidden, rope, None, position_ids=position_ids)[0]

    else:
        # laid out as the projections write them: (1, T, heads, D) memory seen as (1, heads, T, D)
        q, k, v = (torch.randn(1, length, heads, dim, dtype=dtype).transpose(1, 2) for _ in range(3))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        gate_logits = torch.randn(1, length, 2, dtype=dtype, requires_grad=True)
        inputs = [q, k, v, gate_logits]

        def forward() -> torch.Tensor:
            if kind == "dense":
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            layout = Layout.build(None, position_ids, 1, 0, length, q.device)
            return module.attend(q, k, v, gate_logits, layout)

    # the gradient arriving from above, allocated up front like the rest of a network's activations
    grad_output = torch.randn(1, length, config.hidden_size, dtype=dtype)
    if level == "attention":
        grad_output = grad_output.view(1, length, heads, dim).transpose(1, 2)  # (1, nH, T, D)

    def step() -> None:
        forward().backward(grad_output)
        for tensor in inputs:
            tensor.grad = None
        module.zero_grad(set_to_none=True)

    return step


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def peak_memory(level: str, kind: str, length: int, dtype: str) -> None:
    """Child process: print the peak resident memory (MiB) of one forward + backward above the set-up."""
    step = build(level, kind, length, getattr(torch, dtype))
    step()  # warm-up: one-time library buffers are not the step's memory
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # high-water mark := current resident size
    step()
    print(json.dumps({"peak_mib": (_status_kib("VmHWM") - before) / 1024}))


def measure_memory(config: tuple[str, str], length: int, dtype: str) -> float:
    cmd = [sys.executable, __file__, "--child", *config, str(length), dtype]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


CONFIGS = [(level, kind) for level in ("attention", "module") for kind in ("dense", "sparse")]


def measure_time(length: int, dtype: str, repeats: int) -> dict[tuple[str, str], dict[str, float]]:
    """Median wall and CPU seconds per forward + backward of every config, alternating in this process."""
    steps = {config: build(*config, length, getattr(torch, dtype)) for config in CONFIGS}
    if length <= 8192:  # warm-up (at longer lengths one-time costs are lost in the noise)
        for step in steps.values():
            step()
    wall: dict[tuple[str, str], list[float]] = {config: [] for config in steps}
    cpu: dict[tuple[str, str], list[float]] = {config: [] for config in steps}
    for _ in range(repeats):
        for config, step in steps.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            step()
            wall[config].append(time.perf_counter() - start_wall)
            cpu[config].append(time.process_time() - start_cpu)
    return {
        config: {"wall": statistics.median(wall[config]), "cpu": statistics.median(cpu[config])}
        for config in steps
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short lengths, few repeats (a smoke run)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: CPU time is then the compute cost)"
    )
    parser.add_argument(
        "--child", nargs=4, metavar=("LEVEL", "KIND", "LENGTH", "DTYPE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        peak_memory(args.child[0], args.child[1], int(args.child[2]), args.child[3])
        return

    if args.quick:
        rows = [(1024, "float32", 3), (2048, "float32", 3), (2048, "bfloat16", 3)]
    else:
        rows = [(2048, "float32", 7), (8192, "float32", 5), (20480, "float32", 3), (20480, "bfloat16", 2)]
    results = []
    for length, dtype, repeats in rows:
        seconds = measure_time(length, dtype, repeats)
        for level in ("attention", "module"):
            dense, sparse = (level, "dense"), (level, "sparse")
            memory = {config: measure_memory(config, length, dtype) for config in (dense, sparse)}
            row = {
                "level": level,
                "tokens": length,
                "dtype": dtype,
                "dense_cpu_s": seconds[dense]["cpu"],
                "sparse_cpu_s": seconds[sparse]["cpu"],
                "speedup": seconds[dense]["cpu"] / seconds[sparse]["cpu"],
                "dense_wall_s": seconds[dense]["wall"],
                "sparse_wall_s": seconds[sparse]["wall"],
                "wall_speedup": seconds[dense]["wall"] / seconds[sparse]["wall"],
                "dense_peak_mib": memory[dense],
                "sparse_peak_mib": memory[sparse],
                "memory_ratio": memory[sparse] / memory[dense],
                "repeats": repeats,
            }
            results.append(row)
            print(json.dumps(row), flush=True)

    lines = [
        "| measured | tokens | dtype | dense sdpa fwd+bwd (CPU s) | sparse fwd+bwd (CPU s) | speedup "
        "| wall-clock speedup | dense peak (MiB) | sparse peak (MiB) | sparse / dense memory |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['level']} | {r['tokens']} | {r['dtype']} | {r['dense_cpu_s']:.3f} | {r['sparse_cpu_s']:.3f} | "
            f"{r['speedup']:.1f}x | {r['wall_speedup']:.1f}x | {r['dense_peak_mib']:.0f} | {r['sparse_peak_mib']:.0f} | "
            f"{r['memory_ratio']:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        meta = {"torch": torch.__version__, "threads": args.threads, "shape": SHAPE, "rows": results}
        (RESULTS / "sparse_attention.json").write_text(json.dumps(meta, indent=2) + "\n")
        (RESULTS / "sparse_attention.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
