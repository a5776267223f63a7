"""Quantized experts (int8 / NF4) against the unquantized model: quality, memory, speed, loading.

Every measurement runs in a fresh process (`--worker ...`), configurations interleaved over rounds so
that background load hits them alike; results are ratios to the unquantized run of the same round.

- quality: the bundled quickstart recipe (tiny built-in preset, fp32) trained three ways, float /
  int8 / NF4 experts, same seed and data: held-out loss after training (targets: int8 within 1%,
  NF4 within 3%); the same on a transformers Qwen3-MoE-shaped model (4 layers, 16 experts top-4).
- memory: a Qwen3-MoE-shaped model where experts dominate (128 experts top-8, hidden 1024, expert
  width 512, 2 layers, vocabulary 4096), saved in bf16 as 200 MB shards. Resident memory above the
  process's own baseline after imports: once loaded, and at the peak of loading plus LoRA steps
  (r=16 on attention + experts, 1 x 256 tokens). bf16 / int8 / NF4 (targets: loaded NF4 <= 0.32x,
  int8 <= 0.55x of bf16; peak NF4 <= 0.45x, int8 <= 0.65x).
- speed: whole LoRA training steps (forward + backward + AdamW) of 1 x 2048 tokens on that model,
  wall time, 2 threads: int8 / NF4 experts against the unquantized bf16 routed path (targets:
  int8 <= 1.3x, NF4 <= 1.8x).
- loading: quantize-on-load (NF4) of a 2 GB bf16 checkpoint in 200 MB shards (the same shape with
  5 layers): peak resident memory of the whole process (target: below 1.3 GB).
- CPU memory settings (finetune.cpu_memory, on by default): memory and speed also run bf16 and NF4
  with `MOETUNE_CPU_MEMORY=keep` (the settings off), interleaved with the rest, to show what the
  settings save and what they cost.
- kernels: why these kernels. Dequantizing one 1024 x 1024 expert (bitsandbytes' NF4 kernel against
  the same lookup in torch; int8 in torch), and torch's weight-only int8 matmul against dequantize +
  GEMM for 128 tokens; fp32 and bf16, one thread, medians of interleaved repeats in one process.

    python benchmarks/quantized_experts.py                 # all parts; writes benchmarks/results/quantized_experts.*
    python benchmarks/quantized_experts.py --part memory   # one part (results of the others are kept)
    python benchmarks/quantized_experts.py --quick         # a smoke run of every part, writes nothing
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.proc_memory import reset_peak, status  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "runs" / "bench-quantized"
KINDS = ("float", "int8", "nf4")
KEEP = "@keep"  # a kind with this suffix runs with finetune.cpu_memory's settings off
SETTINGS_KINDS = (*KINDS, "float" + KEEP, "nf4" + KEEP)
PARTS = ("quality", "memory", "speed", "loading", "kernels")
TARGETS = {
    "quality": {"int8": 1.01, "nf4": 1.03},
    "loaded": {"int8": 0.55, "nf4": 0.32},
    "peak": {"int8": 0.65, "nf4": 0.45},
    "speed": {"int8": 1.3, "nf4": 1.8},
    "loading_peak_gb": 1.3,
}


# ----------------------------------------------------------------------------- models on disk


def qwen_config(layers: int, experts: int = 128, top_k: int = 8, hidden: int = 1024, width: int = 512):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=4096, hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=width,
        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4, head_dim=hidden // 8,
        num_experts=experts, num_experts_per_tok=top_k, max_position_embeddings=4096, norm_topk_prob=True,
        bos_token_id=None, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip


def write_model(folder: Path, config, dtype: str, shard: str = "200MB") -> Path:
    """A seeded random model of `config` with the offline tokenizer (vocabulary = config.vocab_size)."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.tokenizer import build_tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    with torch.no_grad():  # a real spread of router scores (transformers starts some routers at zero)
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 0.5)
    model.save_pretrained(folder, max_shard_size=shard)
    build_tokenizer(config.vocab_size).save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- workers (one process each)


def worker_quality(kind: str, model: str, steps: int, out: Path) -> dict:
    """Train the quickstart recipe (or `model`) with experts `kind`; held-out loss before / after."""
    from finetune.train import launch_training

    overrides = [f"train.max_steps={steps}", "train.save_every=null", "train.eval_every=null"]
    if model != "preset:tiny":
        overrides += [f"model.name={model}", "model.dtype=float32", "adapter.targets=[attention, experts]"]
    if kind != "float":
        overrides.append(f"model.quantize={kind}")
    launch_training("quickstart", overrides=overrides, output_dir=out)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"eval_loss_before": metrics["eval_loss_before"], "eval_loss_after": metrics["eval_loss_after"]}


def _import_finetune_first(kind: str) -> str:
    """`import finetune` before torch, as the CLI does (its CPU memory settings precede torch), with
    the settings off for a `...@keep` kind; returns the kind without the suffix."""
    base, _, settings = kind.partition("@")
    if settings == "keep":
        os.environ["MOETUNE_CPU_MEMORY"] = "keep"
    import finetune  # noqa: F401

    return base


def _lora_step_setup(kind: str, folder: Path):
    import torch

    from adapters import apply_lora
    from finetune.loading import load_model

    quantize = None if kind == "float" else kind
    model, _ = load_model(str(folder), dtype="bfloat16", quantize=quantize)
    model = apply_lora(model, targets=["attention", "experts"], r=16, alpha=32)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4)


def _step(model, optimizer, batch) -> float:
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


def _batch(tokens: int, vocab: int = 4096):
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (1, tokens), generator=gen)
    return {"input_ids": ids, "labels": ids.clone()}


def worker_memory(kind: str, folder: Path, steps: int) -> dict:
    kind = _import_finetune_first(kind)
    import torch

    import adapters  # noqa: F401  (peft, bitsandbytes and the model code imported before the baseline)
    import finetune  # noqa: F401
    from finetune.quantization import formats

    formats._bitsandbytes_dequantize()
    torch.set_num_threads(2)
    base = status("VmRSS")
    reset_peak()
    model, optimizer = _lora_step_setup(kind, folder)
    loaded = status("VmRSS") - base
    batch = _batch(256)
    losses = [_step(model, optimizer, batch) for _ in range(steps)]
    return {"loaded": loaded, "peak": status("VmHWM") - base, "baseline": base, "losses": losses}


def worker_speed(kind: str, folder: Path, steps: int) -> dict:
    kind = _import_finetune_first(kind)
    import torch

    torch.set_num_threads(2)
    model, optimizer = _lora_step_setup(kind, folder)
    batch = _batch(2048)
    _step(model, optimizer, batch)  # warm-up: first-touch allocations, lazy inits
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        _step(model, optimizer, batch)
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "all_s": times}


def worker_loading(folder: Path) -> dict:
    _import_finetune_first("nf4")
    import adapters  # noqa: F401
    from finetune.loading import load_model

    start = time.perf_counter()
    model, _ = load_model(str(folder), quantize="nf4")
    return {
        "peak_rss": status("VmHWM"),
        "rss_after": status("VmRSS"),
        "seconds": time.perf_counter() - start,
    }


# ----------------------------------------------------------------------------- driver


def run_worker(*args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("OMP_NUM_THREADS", "2")
    done = subprocess.run(
        [sys.executable, __file__, "--worker", *args], env=env, capture_output=True, text=True, cwd=ROOT
    )
    if done.returncode != 0:
        raise SystemExit(f"worker {args} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def part_quality(quick: bool) -> dict:
    steps = 20 if quick else 200
    qwen = write_model(
        WORK / "qwen-quality", qwen_config(4, experts=16, top_k=4, hidden=256, width=128), "float32"
    )
    out = {}
    for label, model in (("quickstart", "preset:tiny"), ("qwen3_moe", str(qwen))):
        rows = {
            kind: run_worker("quality", kind, model, str(steps), str(WORK / f"q-{label}-{kind}"))
            for kind in KINDS
        }
        base = rows["float"]["eval_loss_after"]
        out[label] = {
            "steps": steps,
            **{kind: rows[kind] for kind in KINDS},
            "ratio": {kind: rows[kind]["eval_loss_after"] / base for kind in ("int8", "nf4")},
        }
    return out


def _interleaved(rounds: int, make_args, kinds: tuple[str, ...] = KINDS) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {kind: [] for kind in kinds}
    for r in range(rounds):
        order = kinds if r % 2 == 0 else tuple(reversed(kinds))
        for kind in order:
            results[kind].append(run_worker(*make_args(kind)))
    return results


def part_memory(quick: bool) -> dict:
    folder = write_model(WORK / "qwen-bf16", qwen_config(2), "bfloat16")
    rounds, steps = (1, 1) if quick else (3, 3)
    results = _interleaved(rounds, lambda kind: ("memory", kind, str(folder), str(steps)), SETTINGS_KINDS)
    out = {"rounds": rounds, "steps": steps, "settings": _settings_effect(results, "peak")}
    for key in ("loaded", "peak"):
        base = [r[key] for r in results["float"]]
        out[key] = {
            "bf16_bytes": statistics.median(base),
            **{
                kind: {
                    "bytes": statistics.median(r[key] for r in results[kind]),
                    "ratios": [r[key] / b for r, b in zip(results[kind], base)],
                }
                for kind in ("int8", "nf4")
            },
        }
    return out


def part_speed(quick: bool) -> dict:
    folder = write_model(WORK / "qwen-bf16", qwen_config(2), "bfloat16")
    rounds, steps = (1, 1) if quick else (3, 2)
    results = _interleaved(rounds, lambda kind: ("speed", kind, str(folder), str(steps)), SETTINGS_KINDS)
    base = [r["step_s"] for r in results["float"]]
    out = {"rounds": rounds, "steps_per_round": steps, "bf16_step_s": statistics.median(base)}
    out["settings"] = _settings_effect(results, "step_s")
    for kind in ("int8", "nf4"):
        ratios = [r["step_s"] / b for r, b in zip(results[kind], base)]
        out[kind] = {"step_s": statistics.median(r["step_s"] for r in results[kind]), "ratios": ratios}
    return out


def _settings_effect(results: dict[str, list[dict]], key: str) -> dict:
    """{kind: {on, off, ratios on / off}} of `key` for the kinds also run with the settings off."""
    effect = {}
    for kind in (k.removesuffix(KEEP) for k in SETTINGS_KINDS if k.endswith(KEEP)):
        on, off = [r[key] for r in results[kind]], [r[key] for r in results[kind + KEEP]]
        effect[kind] = {
            "on": statistics.median(on),
            "off": statistics.median(off),
            "ratios": [a / b for a, b in zip(on, off)],
        }
    return effect


def part_loading(quick: bool) -> dict:
    layers = 2 if quick else 5
    folder = write_model(WORK / f"qwen-bf16-{layers}l", qwen_config(layers), "bfloat16")
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    shards = len(list(folder.glob("*.safetensors")))
    runs = [run_worker("loading", str(folder)) for _ in range(1 if quick else 3)]
    return {
        "checkpoint_bytes": size,
        "shards": shards,
        "peak_rss": [r["peak_rss"] for r in runs],
        "seconds": [r["seconds"] for r in runs],
    }


def part_kernels(quick: bool) -> dict:
    import torch

    from finetune.quantization import formats
    from finetune.quantization.formats import QuantizedShape

    torch.set_num_threads(1)
    repeats = 5 if quick else 50
    shape = QuantizedShape("nf4", 1, 1024, 1024)
    weight = torch.randn(1, 1024, 1024)
    nf4_codes, nf4_absmax = formats.quantize(weight, "nf4")
    int8_codes, int8_scale = formats.quantize(weight, "int8")
    x = torch.randn(128, 1024)

    def cases_for(dtype):  # one scope per dtype, so the lambdas bind their own tensors
        w, xd, scale = weight[0].to(dtype), x.to(dtype), int8_scale[0].unsqueeze(-1)
        return {
            "nf4 dequantize, bitsandbytes": lambda: formats.dequantize_nf4(
                nf4_codes[0], nf4_absmax[0], shape, dtype
            ),
            "nf4 dequantize, torch": lambda: formats.dequantize_nf4_reference(
                nf4_codes[0], nf4_absmax[0], shape, dtype
            ),
            "int8 dequantize, torch": lambda: torch.mul(int8_codes[0], scale).to(dtype),
            "GEMM 128 x 1024 x 1024": lambda: xd @ w.t(),
            "int8 dequantize + GEMM": lambda: xd @ torch.mul(int8_codes[0], scale).to(dtype).t(),
            "torch._weight_int8pack_mm": lambda: torch._weight_int8pack_mm(
                xd, int8_codes[0], int8_scale[0].to(dtype)
            ),
        }

    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        cases = cases_for(dtype)
        times: dict[str, list[float]] = {name: [] for name in cases}
        for fn in cases.values():
            fn()  # warm-up
        for _ in range(repeats):
            for name, fn in cases.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        out[str(dtype).removeprefix("torch.")] = {
            name: statistics.median(t) * 1e3 for name, t in times.items()
        }
    return out


def _fmt_ratio(values: list[float]) -> str:
    med = statistics.median(values)
    return f"**{med:.2f}x** ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else f"**{med:.2f}x**"


def _settings_lines(effect: dict | None, what: str, fmt) -> list[str]:
    if not effect:
        return []
    lines = [
        f"finetune.cpu_memory's settings on (the default, above) and off (`MOETUNE_CPU_MEMORY=keep`), {what}:",
        "",
        "| experts | on | off | on / off (median, range) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for kind, row in effect.items():
        label = "bf16" if kind == "float" else kind
        lines.append(f"| {label} | {fmt(row['on'])} | {fmt(row['off'])} | {_fmt_ratio(row['ratios'])} |")
    return [*lines, ""]


def write_markdown(results: dict, path: Path) -> None:
    lines = ["# Quantized experts: measured", "", f"Machine: {results['machine']}", ""]
    if "quality" in results:
        lines += ["## Quality (held-out loss after training; ratio to float experts)", ""]
        lines += [
            "| model | steps | float | int8 (ratio) | NF4 (ratio) | target |",
            "| --- | ---: | ---: | ---: | ---: | --- |",
        ]
        for label, row in results["quality"].items():
            if not isinstance(row, dict):
                continue  # wall_s
            lines.append(
                f"| {label} | {row['steps']} | {row['float']['eval_loss_after']:.4f} | "
                f"{row['int8']['eval_loss_after']:.4f} ({row['ratio']['int8']:.4f}) | "
                f"{row['nf4']['eval_loss_after']:.4f} ({row['ratio']['nf4']:.4f}) | int8 <= 1.01, NF4 <= 1.03 |"
            )
        lines.append("")
    if "memory" in results:
        m = results["memory"]
        lines += [f"## Memory above the process baseline ({m['rounds']} rounds, median; range)", ""]
        lines += [
            "| when | bf16 | int8 / bf16 | NF4 / bf16 | targets |",
            "| --- | ---: | ---: | ---: | --- |",
        ]
        for key, label in (("loaded", "loaded"), ("peak", f"peak of load + {m['steps']} LoRA steps 1 x 256")):
            row = m[key]
            lines.append(
                f"| {label} | {row['bf16_bytes'] / 2**20:.0f} MiB | {_fmt_ratio(row['int8']['ratios'])} | "
                f"{_fmt_ratio(row['nf4']['ratios'])} | int8 <= {TARGETS[key]['int8']}, NF4 <= {TARGETS[key]['nf4']} |"
            )
        lines.append("")
        lines += _settings_lines(
            m.get("settings"), "peak above the baseline", lambda v: f"{v / 2**20:.0f} MiB"
        )
    if "speed" in results:
        s = results["speed"]
        lines += [f"## Speed: LoRA step 1 x 2048 tokens, wall time, 2 threads ({s['rounds']} rounds)", ""]
        lines += [
            "| experts | step (median) | ratio to bf16 (median, range) | target |",
            "| --- | ---: | ---: | --- |",
        ]
        lines.append(f"| bf16 (routed path) | {s['bf16_step_s']:.2f} s | 1 | |")
        for kind in ("int8", "nf4"):
            lines.append(
                f"| {kind} | {s[kind]['step_s']:.2f} s | {_fmt_ratio(s[kind]['ratios'])} | <= {TARGETS['speed'][kind]} |"
            )
        lines.append("")
        lines += _settings_lines(s.get("settings"), "step", lambda v: f"{v:.2f} s")
    if "loading" in results:
        ld = results["loading"]
        peaks = ", ".join(f"{p / 1e9:.2f}" for p in ld["peak_rss"])
        lines += ["## Loading: quantize-on-load (NF4)", ""]
        lines.append(
            f"{ld['checkpoint_bytes'] / 1e9:.2f} GB bf16 checkpoint in {ld['shards']} shards: peak RSS of the whole "
            f"process {peaks} GB (target < {TARGETS['loading_peak_gb']} GB), {statistics.median(ld['seconds']):.0f} s."
        )
    if "kernels" in results:
        k = results["kernels"]
        lines += ["", "## Kernels (one thread, median ms; 1024 x 1024 expert, 128 tokens)", ""]
        names = [n for n in k["float32"] if n != "wall_s"]
        lines += ["| operation | float32 | bfloat16 |", "| --- | ---: | ---: |"]
        lines += [f"| {n} | {k['float32'][n]:.3f} | {k['bfloat16'][n]:.3f} |" for n in names]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=PARTS, action="append")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", nargs="+")
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        fn = {
            "quality": worker_quality,
            "memory": worker_memory,
            "speed": worker_speed,
            "loading": worker_loading,
        }[kind]
        if kind == "quality":
            result = fn(rest[0], rest[1], int(rest[2]), Path(rest[3]))
        elif kind == "loading":
            result = fn(Path(rest[0]))
        else:
            result = fn(rest[0], Path(rest[1]), int(rest[2]))
        print(json.dumps(result))
        return
    WORK.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / "quantized_experts.json"
    results = json.loads(json_path.read_text()) if json_path.exists() and not args.quick else {}
    results["machine"] = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads 2"
    )
    for part in args.part or PARTS:
        start = time.perf_counter()
        results[part] = globals()[f"part_{part}"](args.quick)
        results[part]["wall_s"] = time.perf_counter() - start
        print(f"{part}: {json.dumps(results[part])[:400]}", flush=True)
    if args.quick:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2))
    write_markdown(results, RESULTS / "quantized_experts.md")
    print(f"wrote {json_path} and quantized_experts.md")


if __name__ == "__main__":
    main()
