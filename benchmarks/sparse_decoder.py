"""Decoder level: a 1-layer MoE decoder with hierarchical sparse vs dense sdpa attention, training-step wall time.

The module benchmark (benchmarks/sparse_attention.py) times the attention alone; what a user waits
for is the whole step. Here both sides are the built-in `MoetuneForCausalLM` with one decoder layer:
hidden 512, 8 heads x 64 (8 KV heads), the tiny preset's MoE (8 routed experts top-2 + 1 shared, expert
width 32), vocabulary 1024, fp32, every parameter trained. One step = forward with labels (the loss)
+ backward. Dense: transformers' sdpa (`is_causal` on one document; on packed input the block-diagonal
causal mask transformers builds from `position_ids`). Sparse: local window 8 + summaries of 10-token
blocks.

Inputs:
- `document`: one unpadded document per row (the sparse fused CPU fast path);
- `packed`: documents of `--doc-length` tokens packed into the row, position_ids restarting at 0,
  no attention mask: what every bundled text recipe feeds (the sparse general path).

Protocol: every (input, length, kind, round) is a fresh process with `--threads` torch threads
(default 2); each round runs dense and sparse back to back, alternating which goes first; a process
runs `--warmup` untimed steps, then `--steps` timed ones. Per round the ratio is dense median step
wall / sparse median step wall; the report gives the min / median / max of those ratios over the
rounds (the spread is the noise), the medians of forward and backward wall per kind, and per step the
process's CPU time, minor page faults and involuntary context switches (getrusage): a slow step with
many involuntary switches lost its cores to other processes; one with many page faults and system
time, to the allocator.

    .venv/bin/python benchmarks/sparse_decoder.py              # 2048, 8192, 20480 tokens, both inputs
    .venv/bin/python benchmarks/sparse_decoder.py --quick      # 1024 tokens, 1 round: a smoke run
    .venv/bin/python benchmarks/sparse_decoder.py --profile sparse document 8192   # where the time goes

Writes benchmarks/results/sparse_decoder.{json,md} (not with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
KINDS = ("dense", "sparse")
INPUTS = ("document", "packed")
SHAPE = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=8, head_dim=64, num_hidden_layers=1)


def build(kind: str, inputs: str, length: int, doc_length: int):
    """The 1-layer model and one batch: (model, batch dict)."""
    import torch

    from finetune.modeling import MoetuneForCausalLM, preset_config

    config = preset_config(
        "tiny", **SHAPE, attention_type="dense" if kind == "dense" else "hierarchical_sparse",
        local_window=8, global_ratio=0.1, max_position_embeddings=max(length, 4096),
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = MoetuneForCausalLM(config).train()
    input_ids = torch.randint(3, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": input_ids, "labels": input_ids, "use_cache": False}  # as train.py runs it
    if inputs == "packed":
        batch["position_ids"] = (torch.arange(length) % doc_length)[None]
    return model, batch


def _usage() -> tuple[float, float, int, int]:
    """(user s, system s, minor page faults, involuntary context switches) of this process so far."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime, u.ru_stime, u.ru_minflt, u.ru_nivcsw


def child(kind: str, inputs: str, length: int, args) -> dict:
    """One fresh process: warm-up, then timed steps; per step forward / backward wall and getrusage deltas."""
    import torch

    torch.set_num_threads(args.threads)
    model, batch = build(kind, inputs, length, args.doc_length)
    steps = []
    for step in range(args.warmup + args.steps):
        before, start = _usage(), time.perf_counter()
        loss = model(**batch).loss
        middle = time.perf_counter()
        loss.backward()
        end = time.perf_counter()
        after = _usage()
        model.zero_grad(set_to_none=True)
        if step >= args.warmup:
            user, system, faults, switches = (b - a for a, b in zip(before, after))
            steps.append(
                {"forward_s": middle - start, "backward_s": end - middle, "step_s": end - start,
                 "user_s": user, "system_s": system, "minor_faults": faults, "involuntary_switches": switches}
            )  # fmt: skip
    return {"steps": steps, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(kind: str, inputs: str, length: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, inputs, str(length), "--threads", str(args.threads)]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--doc-length", str(args.doc_length)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{kind}/{inputs}/{length} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def measure(inputs: str, length: int, args) -> dict:
    """Alternating rounds of fresh dense and sparse processes; per-round ratios and per-kind medians."""
    runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    for round_index in range(args.rounds):
        for kind in KINDS if round_index % 2 == 0 else KINDS[::-1]:
            result = run_child(kind, inputs, length, args)
            runs[kind].append(result)
            walls = [round(s["step_s"], 3) for s in result["steps"]]
            print(f"  {inputs:<8} {length:>6} {kind:<6} step wall {walls}", flush=True)

    def median_of(kind: str, key: str, run: dict | None = None) -> float:
        chosen = [run] if run is not None else runs[kind]
        return statistics.median(s[key] for r in chosen for s in r["steps"])

    ratios = [
        median_of("dense", "step_s", d) / median_of("sparse", "step_s", s)
        for d, s in zip(runs["dense"], runs["sparse"])
    ]
    row = {"inputs": inputs, "tokens": length, "rounds": args.rounds, "ratio": spread(ratios)}
    for kind in KINDS:
        row[kind] = {
            key: median_of(kind, key)
            for key in ("step_s", "forward_s", "backward_s", "user_s", "system_s", "minor_faults")
        }
        row[kind]["step_s_spread"] = spread([s["step_s"] for r in runs[kind] for s in r["steps"]])
        row[kind]["backward_s_spread"] = spread([s["backward_s"] for r in runs[kind] for s in r["steps"]])
        row[kind]["involuntary_switches"] = sum(
            s["involuntary_switches"] for r in runs[kind] for s in r["steps"]
        )
        row[kind]["peak_rss_mib"] = statistics.median(r["peak_rss_mib"] for r in runs[kind])
    return row


def markdown(rows: list[dict], args) -> str:
    lines = [
        "# Decoder level: 1-layer MoE decoder, hierarchical sparse vs dense sdpa",
        "",
        f"Command: `.venv/bin/python benchmarks/sparse_decoder.py` (rounds={args.rounds}, steps={args.steps}, "
        f"warmup={args.warmup}, threads={args.threads}, doc length {args.doc_length} for packed input); "
        f"torch {__import__('torch').__version__}, {platform.machine()}, {os.cpu_count()} cores. "
        "Step = forward (loss) + backward, wall seconds, median over every timed step of every process; "
        "speedup = dense / sparse per round (min / median / max over rounds).",
        "",
        "| input | tokens | dense step (s) | sparse step (s) | speedup min / median / max | sparse forward (s) "
        "| sparse backward (s), min-max | dense backward (s), min-max | peak RSS dense / sparse (MiB) |",
        "| --- | ---: | ---: | ---: | --- | ---: | --- | --- | --- |",
    ]
    for r in rows:
        d, s, q = r["dense"], r["sparse"], r["ratio"]
        lines.append(
            f"| {r['inputs']} | {r['tokens']} | {d['step_s']:.3f} | {s['step_s']:.3f} "
            f"| {q['min']:.2f}x / **{q['median']:.2f}x** / {q['max']:.2f}x | {s['forward_s']:.3f} "
            f"| {s['backward_s']:.3f} ({s['backward_s_spread']['min']:.3f}-{s['backward_s_spread']['max']:.3f}) "
            f"| {d['backward_s']:.3f} ({d['backward_s_spread']['min']:.3f}-{d['backward_s_spread']['max']:.3f}) "
            f"| {d['peak_rss_mib']:.0f} / {s['peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def profile(kind: str, inputs: str, length: int, args) -> None:
    """Where one step's time goes: its parts timed alone, then torch.profiler's top operators."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    from transformers.masking_utils import create_causal_mask

    torch.set_num_threads(args.threads)
    model, batch = build(kind, inputs, length, args.doc_length)
    layer = model.model.layers[0]
    captured = {}

    def keep(name):
        def hook(module, hook_args, hook_kwargs):
            captured[name] = (hook_args, hook_kwargs)

        return hook

    handles = [
        layer.self_attn.register_forward_pre_hook(keep("attention"), with_kwargs=True),
        layer.mlp.register_forward_pre_hook(keep("moe"), with_kwargs=True),
    ]
    model(**batch).loss.backward()  # warm-up, and the parts' inputs
    for handle in handles:
        handle.remove()
    model.zero_grad(set_to_none=True)

    def leaf(x):
        return x.detach().requires_grad_() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    def part(name):
        """Forward + backward of one captured submodule call, on fresh leaves of its recorded inputs."""
        module = layer.self_attn if name == "attention" else layer.mlp
        hook_args, hook_kwargs = captured[name]
        fresh_args = [leaf(a) for a in hook_args]
        fresh_kwargs = {k: leaf(v) if k == "hidden_states" else v for k, v in hook_kwargs.items()}
        out = module(*fresh_args, **fresh_kwargs)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out))

    def mask():
        embeds = model.model.embed_tokens(batch["input_ids"])
        create_causal_mask(
            config=model.config, inputs_embeds=embeds, attention_mask=None, cache=None,
            position_ids=batch.get("position_ids"),
        )  # fmt: skip

    def whole():
        model(**batch).loss.backward()

    def timed(fn) -> float:
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
        return statistics.median(times)

    parts = {
        "whole step": timed(whole),
        "attention module fwd+bwd": timed(lambda: part("attention")),
        "MoE block fwd+bwd": timed(lambda: part("moe")),
        "4D mask (create_causal_mask)": timed(mask),
    }
    rest = parts["whole step"] - sum(v for k, v in parts.items() if k != "whole step")
    parts["rest: embedding, norms, lm_head, loss, residuals"] = rest
    print(f"{kind} / {inputs} / {length} tokens, {args.threads} threads, median of {args.steps} (wall s):")
    for name, seconds in parts.items():
        print(f"  {name:<52} {seconds:8.3f}  {100 * seconds / parts['whole step']:5.1f}%")
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        whole()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1024 tokens, 1 round, 1 step: a smoke run")
    parser.add_argument("--lengths", default="2048,8192,20480", help="comma list of row lengths")
    parser.add_argument("--inputs", default=",".join(INPUTS), help="comma list of " + ", ".join(INPUTS))
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (fresh processes each)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per process")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    parser.add_argument("--doc-length", type=int, default=2048, help="document length of packed input")
    parser.add_argument(
        "--profile", nargs=3, metavar=("KIND", "INPUT", "LENGTH"), help="breakdown of one step"
    )
    parser.add_argument("--profile-rows", type=int, default=20, help="operators in the profile table")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "INPUT", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], int(args.child[2]), args)))
        return
    if args.profile:
        profile(args.profile[0], args.profile[1], int(args.profile[2]), args)
        return
    if args.quick:
        args.lengths, args.rounds, args.steps, args.doc_length = "1024", 1, 1, min(args.doc_length, 256)
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        for inputs in args.inputs.split(","):
            row = measure(inputs, length, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = markdown(rows, args)
    print(report)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        settings = {k: getattr(args, k) for k in ("rounds", "steps", "warmup", "threads", "doc_length")}
        (RESULTS / "sparse_decoder.json").write_text(
            json.dumps({"args": settings, "rows": rows}, indent=2) + "\n"
        )
        (RESULTS / "sparse_decoder.md").write_text(report)


if __name__ == "__main__":
    main()
