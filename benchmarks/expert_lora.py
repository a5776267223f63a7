"""Expert LoRA training-step wall time and memory: moetune's routed path vs plain PEFT vs the floor.

Same model, same LoRA (r=16, alpha=32 on attention + routed experts), fp32 on the CPU, one training
step = forward + backward + AdamW on the LoRA parameters + zero_grad, timed whole, in wall seconds
(what a user waits for). Three ways to run it, all built through the public `adapters` API only:
- moetune: `adapters.apply_lora` (routed expert LoRA: only routed tokens, no E x out x in delta,
  no dense expert weight gradient);
- peft:    the same `apply_lora` adapter with `adapters.remove_fast_path`: PEFT's own ParamWrapper
  forward on the identical `LoraConfig` (target_modules + target_parameters): W + s·B·A for all
  experts on every forward, through transformers' experts implementation;
- floor:   LoRA on attention only (experts frozen, no expert LoRA): the cost of the step without
  any expert adaptation.
Protocol: every (config, method, round) is a fresh process (peak RSS is its ru_maxrss) with
`--threads` torch threads (default 2); each round runs the three methods back to back, rotating
which goes first, so background load hits them alike. Workers run with torch's own CPU matmul caches
(`MOETUNE_CPU_MEMORY=keep`, as when the results were measured; see finetune.cpu_memory). A process runs `--warmup` untimed steps and
`--steps` timed ones; a round's ratio is the two methods' median step walls in that round. The report
gives every ratio's min / median / max over the rounds: the spread is the noise, and the report says
whether it is smaller than the effect (|1 - median|).

    .venv/bin/python benchmarks/expert_lora.py            # full: writes benchmarks/results/expert_lora.{json,md}
    .venv/bin/python benchmarks/expert_lora.py --quick    # a smoke run (1 x 256 tokens, 2 rounds), writes nothing
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
    """The adapter of `method`, through adapters' public functions only (they outlive its internals)."""
    from adapters import apply_lora, remove_fast_path

    if method == "floor":
        return apply_lora(model, targets=["attention"], r=R, alpha=ALPHA)
    peft_model = apply_lora(model, targets=["attention", "experts"], r=R, alpha=ALPHA)
    if method == "peft":  # the same PeftModel and LoraConfig, on PEFT's own forward
        remove_fast_path(peft_model)
    return peft_model


def worker(name: str, method: str, args) -> dict:
    """One fresh process: `warmup` untimed steps, then `steps` timed whole steps (wall and CPU seconds)."""
    import torch

    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    _, default_batch, default_length, _ = CONFIGS[name]
    batch, length = args.batch or default_batch, args.length or default_length
    model = attach(build_model(name), method)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=gen)
    walls, cpus = [], []
    for step in range(args.warmup + args.steps):
        wall, cpu = time.perf_counter(), time.process_time()
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    return {
        "walls": walls,
        "cpus": cpus,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable": sum(p.numel() for p in params),
        "loss": float(loss),
    }


def run_config(name: str, args) -> dict:
    """Alternating rounds of fresh processes; per-round ratios of median step walls, and their spread."""
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    for round_index in range(args.rounds):
        order = METHODS[round_index % 3 :] + METHODS[: round_index % 3]  # rotate who goes first
        for method in order:
            cmd = [sys.executable, __file__, "--worker", name, method, "--steps", str(args.steps)]
            cmd += ["--warmup", str(args.warmup), "--threads", str(args.threads)]
            if args.batch:
                cmd += ["--batch", str(args.batch)]
            if args.length:
                cmd += ["--length", str(args.length)]
            # torch's own matmul caches (finetune.cpu_memory off), as when these results were measured
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MOETUNE_CPU_MEMORY": "keep"}
            out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
            if out.returncode != 0:
                raise SystemExit(f"{name}/{method} failed:\n{out.stderr[-3000:]}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            runs[method].append(result)
            print(f"  {name:<12} {method:<8} wall s/step {[round(t, 3) for t in result['walls']]} "
                  f"rss {result['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip

    def round_median(method: str, i: int) -> float:
        return statistics.median(runs[method][i]["walls"])

    summary: dict = {}
    for method, results in runs.items():
        summary[method] = {
            "median_wall_s": statistics.median(t for r in results for t in r["walls"]),
            "median_cpu_s": statistics.median(t for r in results for t in r["cpus"]),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in results),
            "trainable_params": results[0]["trainable"],
        }
    pairs = {"wall_vs_peft": ("moetune", "peft"), "wall_vs_floor": ("moetune", "floor"), "floor_vs_peft": ("floor", "peft")}  # fmt: skip
    summary["ratios"] = {
        key: spread([round_median(a, i) / round_median(b, i) for i in range(args.rounds)])
        for key, (a, b) in pairs.items()
    }
    summary["ratios"]["rss_vs_peft"] = summary["moetune"]["peak_rss_mb"] / summary["peft"]["peak_rss_mb"]
    return summary


def spread(values: list[float]) -> dict[str, float]:
    """min / median / max of a ratio over the rounds, and whether that spread is below the effect."""
    low, mid, high = min(values), statistics.median(values), max(values)
    return {"min": low, "median": mid, "max": high, "noise_below_effect": high - low < abs(1 - mid)}


def _ratio(r: dict) -> str:
    noise = "" if r["noise_below_effect"] else " (spread > effect)"
    return f"{r['min']:.2f} / **{r['median']:.2f}x** / {r['max']:.2f}{noise}"


def markdown(results: dict, args) -> str:
    lines = [
        "# Expert LoRA: moetune vs plain PEFT vs attention-only floor (training-step wall time)",
        "",
        f"Command: `.venv/bin/python benchmarks/expert_lora.py` (rounds={args.rounds}, steps={args.steps}, "
        f"warmup={args.warmup}, threads={args.threads}); fp32, r={R}, alpha={ALPHA}, LoRA on attention + "
        f"routed experts; step = forward + backward + AdamW + zero_grad, wall seconds; a fresh process per "
        f"(config, method, round), methods rotating within each round; {platform.machine()} CPU, "
        f"{os.cpu_count()} cores. Ratios: min / median / max over the rounds of the per-round ratio of "
        "median step walls; '(spread > effect)' marks a ratio whose spread is not below |1 - median|.",
        "",
        "| config | batch | moetune step (s) | PEFT step (s) | floor step (s) | moetune / PEFT | moetune / floor "
        "| floor / PEFT | moetune RSS (MB) | PEFT RSS (MB) | RSS moetune / PEFT |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in results.items():
        _, batch, length, _ = CONFIGS[name]
        r = s["ratios"]
        lines.append(
            f"| {name} | {args.batch or batch} x {args.length or length} | {s['moetune']['median_wall_s']:.3f} "
            f"| {s['peft']['median_wall_s']:.3f} | {s['floor']['median_wall_s']:.3f} | {_ratio(r['wall_vs_peft'])} "
            f"| {_ratio(r['wall_vs_floor'])} | {_ratio(r['floor_vs_peft'])} "
            f"| {s['moetune']['peak_rss_mb']:.0f} | {s['peft']['peak_rss_mb']:.0f} | {r['rss_vs_peft']:.2f}x |"
        )
    lines += [
        "",
        "`floor / PEFT` bounds what any expert LoRA can reach against PEFT: the floor is the same step with "
        "frozen experts and no expert LoRA at all.",
        "",
        "Targets (from the issue; judged on the median ratio) and whether this run met them:",
        "",
    ]
    for name, s in results.items():
        description, _, _, (t_peft, t_floor, t_rss) = CONFIGS[name]
        r = s["ratios"]
        checks = []
        for label, target, value in (
            ("step", t_peft, r["wall_vs_peft"]["median"]),
            ("step vs floor", t_floor, r["wall_vs_floor"]["median"]),
            ("RSS", t_rss, r["rss_vs_peft"]),
        ):
            if target:
                versus = "floor" if label == "step vs floor" else "PEFT"
                checks.append(
                    f"{label.split()[0]} <= {target}x {versus}: {value:.2f}x {'met' if value <= target else 'NOT met'}"
                )
        lines.append(f"- **{name}** ({description}): " + ("; ".join(checks) if checks else "no target (reported)"))  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma list of " + ", ".join(CONFIGS))
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds (fresh processes each)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per process")
    parser.add_argument("--batch", type=int, default=None, help="override the batch size")
    parser.add_argument("--length", type=int, default=None, help="override the sequence length")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    parser.add_argument(
        "--quick", action="store_true", help="deepseek_v3 only, 1 x 256 tokens, 2 rounds; writes nothing"
    )
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args)))
        return
    if args.quick:
        args.configs, args.rounds, args.steps, args.warmup = "deepseek_v3", 2, 2, 1
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
