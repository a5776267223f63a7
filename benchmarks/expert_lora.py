"""Expert LoRA speed and memory: moetune's routed path vs plain PEFT `target_parameters` vs the floor.

Same model, same LoRA (r=16, alpha=32 on attention + routed experts), fp32 on the CPU, one training
step = forward + backward + AdamW on the LoRA parameters. Three ways to run it:
- moetune: `adapters.apply_lora` (routed expert LoRA: only routed tokens, no E x out x in delta,
  no dense expert weight gradient);
- peft:    plain `peft.get_peft_model` with the same target_modules + target_parameters (PEFT's
  ParamWrapper: W + s·B·A for all experts on every forward, through transformers' grouped_mm);
- floor:   LoRA on attention only (experts frozen, no expert LoRA): the cost of the step without
  any expert adaptation.
Every (config, method) runs in a fresh subprocess (peak RSS is that process's ru_maxrss); the
methods alternate over several rounds so background load hits them alike; results are medians and
ratios from one run. Step time is the process's CPU time per step with one torch thread (default
`--threads 1`): on a 2-core machine shared with other jobs, wall time swings 3x with the load and
multi-threaded BLAS on small per-expert GEMMs burns its time spin-waiting, while single-thread CPU
time is what the step costs. Wall-clock medians are reported beside it.

    .venv/bin/python benchmarks/expert_lora.py            # full: writes benchmarks/results/expert_lora.{json,md}
    .venv/bin/python benchmarks/expert_lora.py --quick    # a one-minute smoke run, writes nothing
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
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("moetune", "peft", "floor")
R, ALPHA = 16, 32

# name -> (description, batch, length, targets: step <= x peft, step <= x floor, rss <= x peft)
CONFIGS = {
    "deepseek_v3": (
        "transformers DeepSeek-V3, 128 routed experts top-8 + 1 shared, hidden 256, expert width 128, 4 layers",
        4, 512, (0.75, 1.15, 1.0),
    ),
    "small": ("built-in `small` preset (128 experts top-8 + 1 shared, hidden 256, 4 layers)", 4, 512, (None, None, None)),
    "wide": (
        "transformers DeepSeek-V3, 128 routed experts top-8 + 1 shared, hidden 1024, expert width 512, 2 layers",
        1, 2048, (0.5, None, 0.65),
    ),
}  # fmt: skip


def build_model(name: str):
    import torch
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    if name == "small":
        import finetune  # noqa: F401  (registers the built-in architecture)
        from finetune.modeling import preset_config

        config = preset_config("small")
    else:
        wide = name == "wide"
        hidden, width, layers = (1024, 512, 2) if wide else (256, 128, 4)
        config = DeepseekV3Config(
            vocab_size=4096, hidden_size=hidden, intermediate_size=4 * hidden, moe_intermediate_size=width,
            num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8, n_routed_experts=128,
            num_experts_per_tok=8, n_shared_experts=1, first_k_dense_replace=0, n_group=1, topk_group=1,
            q_lora_rank=hidden // 2, kv_lora_rank=hidden // 4, qk_rope_head_dim=16, qk_nope_head_dim=32,
            v_head_dim=32, max_position_embeddings=4096,
        )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # a real spread of router scores, so routing is not uniform by accident
        for pname, param in model.named_parameters():
            if pname.endswith("mlp.gate.weight"):
                param.normal_(0.0, 0.5)
    return model


def attach(model, method: str):
    from peft import LoraConfig, get_peft_model

    from adapters import apply_lora
    from adapters.targets import resolve_targets

    if method == "moetune":
        return apply_lora(model, targets=["attention", "experts"], r=R, alpha=ALPHA)
    if method == "floor":
        return apply_lora(model, targets=["attention"], r=R, alpha=ALPHA)
    resolved = resolve_targets(model, ["attention", "experts"])
    config = LoraConfig(
        r=R,
        lora_alpha=ALPHA,
        target_modules=sorted(resolved.modules),
        target_parameters=sorted(resolved.parameters),
    )
    return get_peft_model(model, config)


def worker(name: str, method: str, args) -> dict:
    import torch

    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    steps, warmup, batch, length = args.steps, args.warmup, args.batch, args.length
    _, default_batch, default_length, _ = CONFIGS[name]
    batch, length = batch or default_batch, length or default_length
    model = attach(build_model(name), method)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=gen)
    times, walls = [], []
    for step in range(warmup + steps):
        start, wall = time.process_time(), time.perf_counter()
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.process_time() - start)
            walls.append(time.perf_counter() - wall)
    return {
        "times": times,
        "walls": walls,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable": sum(p.numel() for p in params),
        "loss": float(loss),
    }


def run_config(name: str, args) -> dict:
    runs = {m: [] for m in METHODS}
    for round_index in range(args.rounds):
        order = METHODS[round_index % 3 :] + METHODS[: round_index % 3]  # rotate who goes first
        for method in order:
            cmd = [sys.executable, __file__, "--worker", name, method, "--steps", str(args.steps)]
            cmd += ["--warmup", str(args.warmup), "--threads", str(args.threads)]
            if args.batch:
                cmd += ["--batch", str(args.batch)]
            if args.length:
                cmd += ["--length", str(args.length)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise SystemExit(f"{name}/{method} failed:\n{out.stderr[-3000:]}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            runs[method].append(result)
            print(f"  {name:<12} {method:<8} cpu s/step {[round(t, 3) for t in result['times']]} wall "
                  f"{[round(t, 3) for t in result['walls']]} rss {result['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip
    summary = {}
    for method, results in runs.items():
        summary[method] = {
            "median_step_s": statistics.median(t for r in results for t in r["times"]),
            "median_wall_s": statistics.median(t for r in results for t in r["walls"]),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in results),
            "trainable_params": results[0]["trainable"],
        }
    m, p, f = summary["moetune"], summary["peft"], summary["floor"]
    summary["ratios"] = {
        "step_vs_peft": m["median_step_s"] / p["median_step_s"],
        "step_vs_floor": m["median_step_s"] / f["median_step_s"],
        "wall_vs_peft": m["median_wall_s"] / p["median_wall_s"],
        "wall_vs_floor": m["median_wall_s"] / f["median_wall_s"],
        "rss_vs_peft": m["peak_rss_mb"] / p["peak_rss_mb"],
    }
    return summary


def markdown(results: dict, args) -> str:
    lines = [
        "# Expert LoRA: moetune vs plain PEFT vs attention-only floor",
        "",
        f"Command: `.venv/bin/python benchmarks/expert_lora.py` (rounds={args.rounds}, steps={args.steps}, "
        f"warmup={args.warmup}, threads={args.threads}); fp32, r={R}, alpha={ALPHA}, LoRA on attention + "
        f"routed experts; step = forward + backward + AdamW; {platform.machine()} CPU, {os.cpu_count()} cores "
        "shared with other jobs. Step = median CPU seconds per step of the process (one torch thread); "
        "wall = median wall seconds, noisier under the shared load. Peak RSS: fresh process per run.",
        "",
        "| config | batch | moetune step (s) | PEFT step (s) | floor step (s) | moetune / PEFT | moetune / floor "
        "| floor / PEFT | wall: moetune / PEFT | wall: moetune / floor "
        "| moetune RSS (MB) | PEFT RSS (MB) | floor RSS (MB) | RSS moetune / PEFT |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in results.items():
        _, batch, length, _ = CONFIGS[name]
        r = s["ratios"]
        lines.append(
            f"| {name} | {args.batch or batch} x {args.length or length} | {s['moetune']['median_step_s']:.3f} "
            f"| {s['peft']['median_step_s']:.3f} | {s['floor']['median_step_s']:.3f} | {r['step_vs_peft']:.2f}x "
            f"| {r['step_vs_floor']:.2f}x "
            f"| {s['floor']['median_step_s'] / s['peft']['median_step_s']:.2f}x "
            f"| {r['wall_vs_peft']:.2f}x | {r['wall_vs_floor']:.2f}x "
            f"| {s['moetune']['peak_rss_mb']:.0f} | {s['peft']['peak_rss_mb']:.0f} "
            f"| {s['floor']['peak_rss_mb']:.0f} | {r['rss_vs_peft']:.2f}x |"
        )
    lines += [
        "",
        "`floor / PEFT` bounds what any expert LoRA can reach against PEFT: the floor is the same step with "
        "frozen experts and no expert LoRA at all.",
        "",
        "Targets (from the issue) and whether this run met them:",
        "",
    ]
    for name, s in results.items():
        description, _, _, (t_peft, t_floor, t_rss) = CONFIGS[name]
        r = s["ratios"]
        checks = []
        if t_peft:
            checks.append(
                f"step <= {t_peft}x PEFT: {r['step_vs_peft']:.2f}x {'met' if r['step_vs_peft'] <= t_peft else 'NOT met'}"
            )
        if t_floor:
            checks.append(
                f"step <= {t_floor}x floor: {r['step_vs_floor']:.2f}x {'met' if r['step_vs_floor'] <= t_floor else 'NOT met'}"
            )
        if t_rss:
            checks.append(
                f"RSS <= {t_rss}x PEFT: {r['rss_vs_peft']:.2f}x {'met' if r['rss_vs_peft'] <= t_rss else 'NOT met'}"
            )
        lines.append(f"- **{name}** ({description}): " + ("; ".join(checks) if checks else "no target (reported)"))  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma list of " + ", ".join(CONFIGS))
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (fresh process each)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per process")
    parser.add_argument("--batch", type=int, default=None, help="override the batch size")
    parser.add_argument("--length", type=int, default=None, help="override the sequence length")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument(
        "--quick", action="store_true", help="deepseek_v3 only, short, 1 round; writes nothing"
    )
    parser.add_argument("--render", action="store_true", help="rewrite the .md from the saved .json only")
    args = parser.parse_args()
    if args.render:  # e.g. after changing the report's layout; the run's settings come from the .json
        saved = json.loads((RESULTS / "expert_lora.json").read_text())
        for key, value in saved.pop("_args", {}).items():
            setattr(args, key, value)
        (RESULTS / "expert_lora.md").write_text(markdown(saved, args))
        print((RESULTS / "expert_lora.md").read_text())
        return
    if args.worker:
        print(json.dumps(worker(*args.worker, args)))
        return
    if args.quick:
        args.configs, args.rounds, args.steps, args.warmup = "deepseek_v3", 1, 2, 1
        args.batch, args.length = args.batch or 1, args.length or 256
    results = {name: run_config(name, args) for name in args.configs.split(",")}
    report = markdown(results, args)
    print(report)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        run_args = {k: getattr(args, k) for k in ("rounds", "steps", "warmup", "threads", "batch", "length")}
        (RESULTS / "expert_lora.json").write_text(json.dumps({**results, "_args": run_args}, indent=2) + "\n")
        (RESULTS / "expert_lora.md").write_text(report)
        print(f"wrote {RESULTS / 'expert_lora.md'}")


if __name__ == "__main__":
    main()
