"""The full preset (19.2B parameters, 128 experts) trained with NF4 experts on a 24 GB CPU machine.

1. create: `moetune init-model --preset full --quantize nf4` writes the model block by block (its
   routed experts NF4, the other weights bf16), never holding it in full precision; timed, peak RSS.
2. train: a fresh process loads it (quantized folder, positional reads), puts LoRA r=8 on attention
   + routed experts, and runs 3 AdamW steps on one repeated batch of 1 x 256 tokens; per step the
   loss and the wall time, and the process's peak RSS (target <= 18 GB; the machine has 24 GB).
   `import finetune` comes first, so finetune.cpu_memory's settings apply as in `moetune train`.

It is a benchmark (minutes), not a test:

    python benchmarks/full_model.py                 # writes benchmarks/results/full_model.{json,md}
    python benchmarks/full_model.py --keep          # keep the 12 GB model folder (runs/bench-full)
    python benchmarks/full_model.py --preset small  # the same path on the small preset, in seconds
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.proc_memory import status  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PEAK_TARGET_GB = 18.0


def worker_create(preset: str, folder: Path) -> dict:
    import logging

    from finetune.loading import init_model

    logging.basicConfig(
        level=logging.INFO, format="  %(relativeCreated)8.0f ms  %(message)s", stream=sys.stderr
    )
    start = time.perf_counter()
    init_model(preset, folder, quantize="nf4", seed=0)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return {"seconds": time.perf_counter() - start, "peak_rss": status("VmHWM"), "bytes": size}


def worker_train(folder: Path, steps: int, tokens: int) -> dict:
    importlib.import_module("finetune")  # first, as the CLI does: its CPU memory settings precede torch
    import torch

    from adapters import apply_lora
    from finetune.loading import load_model

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    start = time.perf_counter()
    model, tokenizer = load_model(str(folder))
    load_s = time.perf_counter() - start
    load_rss = status("VmRSS")
    model = apply_lora(model, targets=["attention", "experts"], r=8, alpha=16)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    text = (ROOT / "finetune" / "quantization" / "experts.py").read_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    batch = {"input_ids": ids, "labels": ids.clone()}
    losses, times = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        print(f"  step {len(losses)}: loss {losses[-1]:.4f} in {times[-1]:.1f}s", file=sys.stderr, flush=True)
    return {
        "load_s": load_s,
        "rss_after_load": load_rss,
        "trainable_params": trainable,
        "losses": losses,
        "step_s": times,
        "peak_rss": status("VmHWM"),
        "tokens": int(ids.shape[1]),
    }


def run_worker(*args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("OMP_NUM_THREADS", "2")
    done = subprocess.run(
        [sys.executable, __file__, "--worker", *args], env=env, stdout=subprocess.PIPE, cwd=ROOT
    )
    if done.returncode != 0:
        raise SystemExit(f"worker {args} failed (exit {done.returncode})")
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="full")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--keep", action="store_true", help="keep the written model folder")
    parser.add_argument("--worker", nargs="+")
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "create":
            result = worker_create(rest[0], Path(rest[1]))
        else:
            result = worker_train(Path(rest[0]), int(rest[1]), int(rest[2]))
        print(json.dumps(result))
        return
    folder = ROOT / "runs" / f"bench-{args.preset}-nf4"
    if folder.exists():
        shutil.rmtree(folder)
    print(f"create: init-model --preset {args.preset} --quantize nf4 -> {folder}", flush=True)
    created = run_worker("create", args.preset, str(folder))
    print(f"  {created['seconds']:.0f} s, peak RSS {created['peak_rss'] / 1e9:.2f} GB", flush=True)
    print(f"train: LoRA r=8 on attention + experts, {args.steps} steps of 1 x {args.tokens}", flush=True)
    trained = run_worker("train", str(folder), str(args.steps), str(args.tokens))
    if not args.keep:
        shutil.rmtree(folder)
    result = {
        "preset": args.preset,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "create": created,
        "train": trained,
    }
    print(json.dumps(result, indent=2))
    if args.preset != "full":
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "full_model.json").write_text(json.dumps(result, indent=2))
    t = trained
    falling = all(b < a for a, b in zip(t["losses"], t["losses"][1:]))
    lines = [
        "# The full preset with NF4 experts on this CPU machine",
        "",
        f"Machine: {result['machine']} (24 GB RAM), `python benchmarks/full_model.py`.",
        "",
        "| step | value |",
        "| --- | --- |",
        f"| create (init-model --preset full --quantize nf4) | {created['seconds'] / 60:.1f} min, "
        f"{created['bytes'] / 1e9:.1f} GB on disk, peak RSS {created['peak_rss'] / 1e9:.2f} GB |",
        f"| load (quantized folder) | {t['load_s']:.0f} s, RSS {t['rss_after_load'] / 1e9:.2f} GB |",
        f"| LoRA r=8, attention + experts | {t['trainable_params']:,} trainable parameters |",
        f"| {len(t['losses'])} steps of 1 x {t['tokens']} tokens (AdamW) | losses "
        f"{' -> '.join(f'{x:.4f}' for x in t['losses'])} ({'falling' if falling else 'NOT falling'}); "
        f"{' / '.join(f'{s:.0f}' for s in t['step_s'])} s per step |",
        f"| peak RSS of the training process | **{t['peak_rss'] / 1e9:.2f} GB** (target <= {PEAK_TARGET_GB:.0f} GB) |",
    ]
    (RESULTS / "full_model.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
