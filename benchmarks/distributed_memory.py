"""Per-process memory of LoRA training on 2 CPU processes under ddp / fsdp / zero3, against `moetune plan`.

Each engine runs `moetune train`'s own loop (finetune.train.TrainingRun, launched by `accelerate
launch` with the bundled config of `--distributed ENGINE`) in fresh processes, on the quickstart
recipe (fp32, LoRA r=16 on attention + experts + lm_head, batch 8 x 256 per process) with
`preset:small`, eval and trackers off, 3 steps. Every process measures its resident memory ABOVE ITS
OWN BASELINE: the RSS once torch, transformers, peft, accelerate (and DeepSpeed) are imported and
the process group is up, just before the model is built. That takes out the ~0.5 GB of runtime a
CPU process carries before any model exists. Two peaks (the kernel's high-water mark, reset between
them through /proc/self/clear_refs):
- setup: building the base and its LoRA and handing them to the engine (`prepare`);
- steps: the training steps (the largest of the 3).
The plan is asked the same question in CPU bytes: `plan_memory(..., dtype="float32",
device="cpu")` with the recipe's adapter and batch (finetune/plan_terms.py has each term).

Variants (fresh processes each): `small` runs with MALLOC_MMAP_THRESHOLD_=65536, so memory a tensor
frees leaves the RSS at once and the peak is what was live together (what the plan counts); `glibc`
is the same run with glibc's default allocator settings (what a user sees on a CPU; freed memory
is kept); `tiny` is `preset:tiny` (a model of about 1 MB) under the same settings: what a step adds
that the plan does not count (kernels, thread pools, the autograd engine).

    .venv/bin/python benchmarks/distributed_memory.py            # writes benchmarks/results/distributed_memory.{json,md}
    .venv/bin/python benchmarks/distributed_memory.py --quick    # preset:tiny, ddp only, 2 steps; writes nothing
    .venv/bin/python benchmarks/distributed_memory.py --variants small --output DIR   # what the slow test runs

Linux with glibc only. Memory is not timed: a busy machine changes how long it takes, not the bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.proc_memory import reset_peak, status  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
ENGINES = ("ddp", "fsdp", "zero3")
VARIANTS = ("small", "glibc", "tiny")
MIB = 2**20
STEPS = 3  # the first ZeRO-3 step traces the module order; the later ones keep parameters by it
LIVE_ONLY = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # freed blocks of 64 KiB and more go back at once
COMMAND = "python benchmarks/distributed_memory.py"


def worker(recipe_file: Path, run_dir: Path, out: Path) -> None:
    """One launched process: train the recipe, marking its memory; the marks go to OUT.RANK.json."""
    import importlib

    import torch

    # What the run imports later, imported before the baseline: modules are runtime, not model.
    for name in ("transformers", "peft", "datasets", "adapters", "finetune.loading", "finetune.data"):
        importlib.import_module(name)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        importlib.import_module("deepspeed")
    from finetune.recipe import load_recipe
    from finetune.train import TrainingRun

    marks: dict = {"step_peaks": []}

    class MeasuredRun(TrainingRun):
        """The training recipe as `moetune train` runs it, with memory marks between its phases."""

        def setup_model(self):
            torch.ones(1) @ torch.ones(1)  # the first op's one-time allocations: runtime
            marks["baseline"] = status("VmRSS")  # process group up (make_accelerator ran), no model
            reset_peak()
            return super().setup_model()

        def loop(self, *args, **kwargs):
            marks["setup_peak"] = status("VmHWM") - marks["baseline"]
            marks["before_steps"] = status("VmRSS") - marks["baseline"]
            reset_peak()
            super().loop(*args, **kwargs)
            marks["steps_peak"] = max(marks["step_peaks"])

        def train_step(self, *args, **kwargs):
            result = super().train_step(*args, **kwargs)
            marks["step_peaks"].append(status("VmHWM") - marks["baseline"])
            reset_peak()
            return result

    run = MeasuredRun(load_recipe(str(recipe_file)), run_dir, overwrite=True)
    try:
        run.setup()
        run.train()
    finally:
        run.cleanup()
    out.with_name(f"{out.name}.{os.environ.get('RANK', '0')}.json").write_text(json.dumps(marks))


def write_corpus(path: Path, rows: int = 400, seed: int = 0) -> Path:
    """Text rows enough to fill the packed batches (the data is not what is measured)."""
    rng = random.Random(seed)
    words = ["def", "return", "self", "value", "range", "print", "items", "total", "count", "None"]
    with path.open("w") as fh:
        for _ in range(rows):
            fh.write(json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(40, 120)))}) + "\n")
    return path


def recipe_for(model: str, corpus: Path, steps: int):
    """The quickstart recipe on `model`, eval and trackers off (they are not what is planned)."""
    from finetune.recipe import load_recipe

    overrides = [
        f"model.name={model}", f"data.train={corpus}", "data.max_examples=null", "data.eval_fraction=null",
        "data.max_eval_examples=null", "train.eval_every=null", "train.eval_batches=null",
        "output.report_to=[]", f"train.max_steps={steps}", "train.save_every=null",
    ]  # fmt: skip
    return load_recipe("quickstart", overrides)


def plan_for(recipe, engine: str):
    """`moetune plan` for the recipe's model, adapter and batch on 2 CPU processes."""
    from finetune.plan import plan_memory

    return plan_memory(
        recipe.model.name,
        gpus=2,
        strategy=engine,
        dtype=recipe.model.dtype,
        targets=tuple(recipe.adapter.targets),
        r=recipe.adapter.r,
        batch_size=recipe.train.batch_size,
        seq_len=recipe.data.max_length,
        gradient_checkpointing=recipe.model.gradient_checkpointing,
        device="cpu",
    )


def measure(engine: str, recipe, work: Path, env: dict[str, str]) -> list[dict]:
    """Launch the 2-process run of `engine` on `recipe`; the marks of each process."""
    from finetune.launch import engine_config, launch_env, launch_on_a_free_port
    from finetune.recipe import save_recipe

    run_dir = work / f"run-{engine}"
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe_file = save_recipe(recipe, work / f"recipe-{engine}.yaml")
    out = work / f"marks-{engine}"

    def command(port: int) -> list[str]:
        return [
            sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(engine_config(engine)),
            "--num_processes", "2", "--num_machines", "1", "--machine_rank", "0",
            "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
            __file__, "--worker", str(recipe_file), str(run_dir), str(out),
        ]  # fmt: skip

    rc, err = launch_on_a_free_port(command, env=launch_env(2, engine) | env, cwd=ROOT, echo=False)
    if rc != 0:
        raise SystemExit(f"{engine}: the launch failed (exit code {rc}):\n{err[-3000:]}")
    return [json.loads(out.with_name(f"{out.name}.{rank}.json").read_text()) for rank in (0, 1)]


def summarize(ranks: list[dict], plan) -> dict:
    """The largest process's peaks (MiB above its baseline) beside the plan's (MiB) and their ratios."""
    steps = max(r["steps_peak"] for r in ranks) / MIB
    setup = max(r["setup_peak"] for r in ranks) / MIB
    planned_steps, planned_setup = plan.total_gib * 1024, plan.load_peak_gib * 1024
    return {
        "steps_mib": steps,
        "plan_steps_mib": planned_steps,
        "steps_ratio": steps / planned_steps,
        "setup_mib": setup,
        "plan_setup_mib": planned_setup,
        "setup_ratio": setup / planned_setup,
        "plan_terms_mib": {
            k.removesuffix("_gib"): v * 1024 for k, v in plan.as_dict().items() if k.endswith("_gib")
        },
        "ranks": ranks,
    }


def write_markdown(results: dict, path: Path) -> None:
    rows = results["engines"]
    lines = [
        "# Memory per process on 2 CPU processes: measured vs `moetune plan`",
        "",
        f"Machine: {results['machine']}. Command: `{results['command']}`.",
        "",
        f"`{results['model']}`, fp32, LoRA r=16 on attention + experts + lm_head, batch 8 x 256 per process, "
        f"{results['steps']} steps. MiB above each process's own baseline (RSS after imports and process-group "
        "set-up, before the model), the largest of the 2 processes; the plan is "
        "`plan_memory(..., gpus=2, strategy=E, dtype='float32', device='cpu')`.",
        "",
        "| engine | steps: measured | plan | measured / plan | setup: measured | plan (at load) | measured / plan |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for engine, variants in rows.items():
        s = variants["small"]
        lines.append(
            f"| {engine} | {s['steps_mib']:.0f} | {s['plan_steps_mib']:.0f} | **{s['steps_ratio']:.2f}** | "
            f"{s['setup_mib']:.0f} | {s['plan_setup_mib']:.0f} | **{s['setup_ratio']:.2f}** |"
        )
    extra = [e for e, v in rows.items() if "glibc" in v or "tiny" in v]
    if extra:
        lines += [
            "",
            "The same runs under other settings (steps peak, MiB above the baseline):",
            "",
            "| engine | live only (above) | glibc defaults | `preset:tiny`, live only: measured / plan |",
            "| --- | ---: | ---: | ---: |",
        ]
        for engine in extra:
            v = rows[engine]
            glibc = f"{v['glibc']['steps_mib']:.0f}" if "glibc" in v else "-"
            tiny = f"{v['tiny']['steps_mib']:.0f} / {v['tiny']['plan_steps_mib']:.0f}" if "tiny" in v else "-"
            lines.append(f"| {engine} | {v['small']['steps_mib']:.0f} | {glibc} | {tiny} |")
    lines += ["", "Plan terms (MiB per process):", ""]
    names = list(next(iter(rows.values()))["small"]["plan_terms_mib"])
    names = [n for n in names if n != "gpu_memory"]
    lines += ["| engine | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for engine, variants in rows.items():
        terms = variants["small"]["plan_terms_mib"]
        lines.append(f"| {engine} | " + " | ".join(f"{terms[n]:.0f}" for n in names) + " |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="preset:tiny, ddp, 2 steps; writes nothing")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="small, glibc, tiny (comma-separated)")
    parser.add_argument(
        "--output", type=Path, default=None, help="folder of the results (default: benchmarks/results)"
    )
    parser.add_argument("--worker", nargs=3, metavar=("RECIPE", "RUN", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*map(Path, args.worker))
        return
    engines = ["ddp"] if args.quick else args.engines.split(",")
    variants = ["tiny"] if args.quick else args.variants.split(",")
    steps = 2 if args.quick else STEPS
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": " ".join([COMMAND, *sys.argv[1:]]),
        "model": "preset:small",
        "steps": steps,
        "engines": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_corpus(Path(tmp) / "corpus.jsonl")
        for engine in engines:
            results["engines"][engine] = {}
            for variant in variants:
                recipe = recipe_for("preset:tiny" if variant == "tiny" else "preset:small", corpus, steps)
                env = {} if variant == "glibc" else LIVE_ONLY
                ranks = measure(engine, recipe, Path(tmp) / variant, env)
                results["engines"][engine][variant] = summary = summarize(ranks, plan_for(recipe, engine))
                print(
                    engine,
                    variant,
                    {k: round(v, 2) for k, v in summary.items() if isinstance(v, float)},
                    flush=True,
                )
    if args.quick and args.output is None:
        return
    out = args.output or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / "distributed_memory.json").write_text(json.dumps(results, indent=2))
    if "small" in variants:
        write_markdown(results, out / "distributed_memory.md")


if __name__ == "__main__":
    main()
