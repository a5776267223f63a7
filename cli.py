"""moetune command line: parse, call one public function, print. No logic lives here.

Each subcommand maps to one function in `finetune` or `adapters`; imports are lazy so that
`moetune info preset:full` or `moetune recipes` start fast. A `MoetuneError` (a user mistake)
becomes one line on stderr and exit code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

QUANTIZE_METHODS = ("int8", "nf4")  # finetune.quantization.formats.METHODS (not imported: a lazy CLI)
QUANTIZE_HELP = "store the routed experts int8 / nf4 (default: as the checkpoint stores them)"


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _floats(value: str) -> list[float]:
    return [float(v) for v in _csv(value)]


# ----------------------------------------------------------------------------- model commands


def cmd_init_model(args: argparse.Namespace) -> None:
    from finetune.loading import init_model

    written = init_model(
        args.preset,
        args.output,
        attention=args.attention,
        modalities=_csv(args.modalities) if args.modalities else None,
        seed=args.seed,
        quantize=args.quantize,
    )
    print(written)


def cmd_quantize(args: argparse.Namespace) -> None:
    from finetune.loading import quantize_model

    written = quantize_model(
        args.model,
        args.output,
        args.method,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        trust_remote_code=args.trust_remote_code,
    )
    print(written)


def cmd_info(args: argparse.Namespace) -> None:
    from finetune.info import model_info

    info = model_info(args.model, quantize=args.quantize)
    print(json.dumps(info.as_dict(), indent=2) if args.json else info)


def cmd_generate(args: argparse.Namespace) -> None:
    from finetune.generation import generate_text

    print(
        generate_text(
            args.model,
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            adapter=args.adapter,
            image=args.image,
            audio=args.audio,
            chat=args.chat,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            trust_remote_code=args.trust_remote_code,
            allow_pickle=args.allow_pickle,
            quantize=args.quantize,
        )
    )


def cmd_plan(args: argparse.Namespace) -> None:
    from finetune.plan import plan_memory

    plan = plan_memory(
        args.model,
        gpus=args.gpus,
        gpu_memory_gib=args.gpu_memory,
        dtype=args.dtype,
        targets=tuple(_csv(args.targets)),
        r=args.r,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        gradient_checkpointing=not args.no_checkpointing,
        quantize=args.quantize,
        strategy=args.strategy,
    )
    print(json.dumps(plan.as_dict(), indent=2) if args.json else plan)


# ----------------------------------------------------------------------------- training


def cmd_train(args: argparse.Namespace) -> None:
    from finetune.launch import Machines
    from finetune.train import launch_training

    result = launch_training(
        args.recipe,
        overrides=args.set,
        output_dir=args.output,
        resume=args.resume,
        overwrite=args.overwrite,
        num_processes=args.num_processes,
        distributed=args.distributed,
        machines=Machines(
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            main_process_ip=args.main_process_ip,
            main_process_port=args.main_process_port,
        ),
        debug=args.debug,
    )
    if result is not None:  # None: another process of the launch reports
        print(result)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from finetune.evaluation.command import evaluate_model

    result = evaluate_model(
        args.model,
        args.data,
        adapter=args.adapter,
        format=args.format,
        metrics=_csv(args.metrics),
        batch_size=args.batch_size,
        max_examples=args.max_examples,
        max_length=args.max_length,
        max_new_tokens=args.max_new_tokens,
        quantize=args.quantize,
        trust_remote_code=args.trust_remote_code,
    )
    print(json.dumps(result.as_dict(), indent=2) if args.json else result)


def cmd_sweep(args: argparse.Namespace) -> None:
    from finetune.evaluation.sweep import run_sweep

    result = run_sweep(args.recipe, args.grid, output=args.output, overrides=args.set)
    print(json.dumps(result.as_dict(), indent=2) if args.json else result)


def cmd_lm_eval(args: argparse.Namespace) -> None:
    from finetune.evaluation.harness import run_lm_eval

    result = run_lm_eval(
        args.model,
        _csv(args.tasks),
        adapter=args.adapter,
        limit=args.limit,
        batch_size=args.batch_size,
        bootstrap_iters=args.bootstrap_iters,
        quantize=args.quantize,
        trust_remote_code=args.trust_remote_code,
    )
    print(json.dumps(result.as_dict(), indent=2) if args.json else result)


def cmd_recipes(args: argparse.Namespace) -> None:
    from finetune.recipe import list_recipes

    print(list_recipes())


def cmd_experts_profile(args: argparse.Namespace) -> None:
    from finetune.evaluate import profile_experts

    profile = profile_experts(
        args.model,
        data=args.data,
        output=args.output,
        threshold=args.threshold,
        metric=args.metric,
        max_examples=args.max_examples,
        max_length=args.max_length,
        quantize=args.quantize,
    )
    print(profile)


# ----------------------------------------------------------------------------- adapters


def cmd_export_adapter(args: argparse.Namespace) -> None:
    from adapters.export import export_adapter

    base = None
    if args.base:
        from finetune.loading import resolve_model_folder

        base = resolve_model_folder(args.base)
    print(
        export_adapter(
            args.adapter, args.output, fmt=args.format, base=base, rank=args.rank, verify=args.verify
        )
    )


def cmd_verify_export(args: argparse.Namespace) -> None:
    from adapters.serving_verify import verify_export
    from finetune.loading import resolve_model_folder

    print(verify_export(args.export, resolve_model_folder(args.base), args.adapter, tolerance=args.tolerance))


def cmd_merge(args: argparse.Namespace) -> None:
    from adapters.merge import merge_into_base
    from finetune.loading import resolve_model_folder

    print(
        merge_into_base(
            resolve_model_folder(args.model),
            args.adapter,
            args.output,
            verify=args.verify,
            tolerance=args.tolerance,
            max_shard_size=args.max_shard_size,
        )
    )


def cmd_verify_merge(args: argparse.Namespace) -> None:
    from adapters.merge_verify import verify_merge
    from finetune.loading import resolve_model_folder

    print(verify_merge(resolve_model_folder(args.model), args.adapter, args.merged, tolerance=args.tolerance))


def cmd_merge_adapters(args: argparse.Namespace) -> None:
    from adapters.combine import combine_adapters

    print(
        combine_adapters(
            args.adapter,
            args.output,
            method=args.method,
            weights=_floats(args.weights) if args.weights else None,
            density=args.density,
            seed=args.seed,
        )
    )


def cmd_push(args: argparse.Namespace) -> None:
    from adapters.hub import push_folder

    print(
        push_folder(
            args.folder,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            dry_run=args.dry_run,
            base_model=args.base_model,
            license=args.license,
        )
    )


# ----------------------------------------------------------------------------- parser


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keep the examples' line breaks; wrap option help as usual."""


EXAMPLES = {
    "init-model": "moetune init-model --preset tiny --output runs/tiny-base",
    "quantize": "moetune quantize runs/tiny-base --method nf4 --output runs/tiny-nf4",
    "info": "moetune info preset:tiny --json",
    "generate": 'moetune generate runs/quickstart/base-model --adapter runs/quickstart/run/adapter --prompt "def "',
    "plan": "moetune plan preset:full --gpus 8 --gpu-memory 80 --seq-len 8192",
    "train": "moetune train quickstart --set train.max_steps=50 --output runs/qs",
    "recipes": "moetune recipes",
    "lm-eval": "moetune lm-eval preset:tiny --adapter runs/qs/adapter --tasks my_task.yaml --limit 50",
    "sweep": "moetune sweep quickstart --grid adapter.r=2,4,8,16 --output runs/sweep-quickstart",
    "evaluate": "moetune evaluate preset:tiny --adapter runs/qs/adapter --data eval.jsonl --metrics loss",
    "experts": "moetune experts profile preset:tiny --data docs --output runs/esft-profile",
    "experts profile": "moetune experts profile preset:tiny --data docs --output runs/esft-profile",
    "export-adapter": "moetune export-adapter runs/esft/adapter --format per-expert --output runs/esft/per-expert",
    "verify-export": "moetune verify-export runs/x/vllm --base runs/quickstart/base-model --adapter runs/x/adapter",
    "merge": "moetune merge runs/quickstart/base-model --adapter runs/quickstart/run/adapter --output merged --verify",
    "verify-merge": "moetune verify-merge runs/quickstart/base-model --adapter runs/quickstart/run/adapter --merged merged",
    "merge-adapters": "moetune merge-adapters --adapter runs/a/adapter --adapter runs/b/adapter --method ties --output ab",
    "push": "moetune push runs/quickstart/run/adapter --repo-id you/moe-lora --license apache-2.0 --dry-run",
}
EXPORT_FORMATS = (
    "per-expert (compact storage: one LoRA pair per selected expert; servers reject it) | "
    "peft (a per-expert folder back to PEFT's fused layout) | "
    "vllm / sglang (what that server loads for the base's family: every expert present, one rank; docs/serving.md)"
)
MODEL_HELP = "preset:NAME (tiny, small, full), a local model folder, or a hub id (downloaded only then)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moetune",
        description="LoRA fine-tuning for Mixture-of-Experts models.",
        epilog="example:\n  moetune train quickstart\n\n`moetune COMMAND --help` shows each command's options.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors (default: off)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, handler: Callable[[argparse.Namespace], None], help: str, parent=sub
    ) -> argparse.ArgumentParser:
        p = parent.add_parser(
            name,
            help=help,
            description=help,
            epilog=f"example:\n  {EXAMPLES[name]}",
            formatter_class=_HelpFormatter,
        )
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        p.set_defaults(handler=handler)
        return p

    p = add("init-model", cmd_init_model, "write a random-initialised built-in model + tokenizer")
    p.add_argument("--preset", required=True, help="tiny | small | full (required)")
    p.add_argument("--output", required=True, help="folder to write; must be new or empty (required)")
    p.add_argument(
        "--attention",
        default=None,
        help="dense | hierarchical_sparse, for all layers (default: the preset's, dense)",
    )
    p.add_argument(
        "--modalities",
        default=None,
        help="comma list of image,audio,text encoders (default: none, text-only)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (default: 0)")
    p.add_argument(
        "--quantize",
        choices=QUANTIZE_METHODS,
        default=None,
        help="write the routed experts int8 / nf4, block by block: how --preset full is made without GPUs "
        "(default: float experts)",
    )

    p = add("quantize", cmd_quantize, "write MODEL with its routed experts stored int8 or nf4")
    p.add_argument("model", help="a float model: a local folder, a hub id, or preset:NAME")
    p.add_argument(
        "--method",
        required=True,
        choices=QUANTIZE_METHODS,
        help="int8 (per row) or nf4 (blocks of 64) (required)",
    )
    p.add_argument("--output", required=True, help="folder to write; must be new or empty (required)")
    p.add_argument("--dtype", default=None, help="dtype of the other weights (default: the checkpoint's)")
    p.add_argument("--max-shard-size", default=None, help="safetensors shard size (default: 2GB)")
    p.add_argument(
        "--trust-remote-code", action="store_true", help="run the model repository's own code (default: off)"
    )

    p = add(
        "info", cmd_info, "architecture table and adaptable module groups of MODEL (or an adapter's summary)"
    )
    p.add_argument("model", help=MODEL_HELP + "; an adapter folder prints what it adapts and its base")
    p.add_argument("--json", action="store_true", help="print one JSON object (default: a table)")
    p.add_argument(
        "--quantize",
        choices=QUANTIZE_METHODS,
        default=None,
        help="also show the bytes with the routed experts int8 / nf4 (default: as the checkpoint stores them)",
    )

    p = add("generate", cmd_generate, "generate text from a prompt (greedy unless --temperature > 0)")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--prompt", required=True, help="the prompt text (required)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="new tokens at most (default: 32)")
    p.add_argument("--adapter", default=None, help="adapter folder to apply (default: none)")
    layout = p.add_mutually_exclusive_group()
    layout.add_argument(
        "--chat",
        dest="chat",
        action="store_const",
        const=True,
        default=None,
        help="render the prompt as a user message with the chat template (default: the adapter's training "
        "layout, else the chat template when the tokenizer has one)",
    )
    layout.add_argument(
        "--raw",
        dest="chat",
        action="store_const",
        const=False,
        help="use the prompt text as it is (default: off)",
    )
    p.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default: 0)"
    )
    p.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling share, with --temperature (default: 1.0)"
    )
    p.add_argument(
        "--seed", type=int, default=None, help="seed for sampling, repeatable output (default: none)"
    )
    p.add_argument("--image", default=None, help="image file, multimodal models (default: none)")
    p.add_argument("--audio", default=None, help="audio file, multimodal models (default: none)")
    p.add_argument(
        "--trust-remote-code", action="store_true", help="run the model repository's own code (default: off)"
    )
    p.add_argument(
        "--allow-pickle", action="store_true", help="load pickle (.bin) weights you trust (default: off)"
    )
    p.add_argument("--quantize", choices=QUANTIZE_METHODS, default=None, help=QUANTIZE_HELP)

    p = add("plan", cmd_plan, "per-GPU memory plan for LoRA training of MODEL on N GPUs")
    p.add_argument("model", help=MODEL_HELP + " (only its config is read)")
    p.add_argument("--gpus", type=int, default=1, help="number of GPUs (default: 1)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default: 80)")
    p.add_argument("--dtype", default="bfloat16", help="weights and compute dtype (default: bfloat16)")
    p.add_argument(
        "--targets",
        default="attention,experts",
        help="comma list of target groups (default: attention,experts)",
    )
    p.add_argument("--r", type=int, default=16, help="LoRA rank (default: 16)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per GPU and step (default: 1)")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (default: 4096)")
    p.add_argument(
        "--no-checkpointing",
        action="store_true",
        help="plan without gradient checkpointing (default: with it)",
    )
    p.add_argument("--quantize", choices=QUANTIZE_METHODS, default=None, help=QUANTIZE_HELP)
    p.add_argument(
        "--strategy",
        choices=["auto", "ddp", "fsdp", "zero3"],
        default="auto",
        help="how the weights are spread (default: auto: ddp, or fsdp when replicas do not fit)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (default: a table)")

    p = add("train", cmd_train, "fine-tune LoRA adapters from a recipe")
    p.add_argument("recipe", help="recipe YAML (a path or a bundled recipe name)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, repeatable (default: none)",
    )
    p.add_argument("--output", default=None, help="run folder (default: the recipe's output.dir)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint (default: off)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run in the run folder (default: off: a finished run is refused)",
    )
    p.add_argument(
        "--num-processes",
        type=int,
        default=1,
        help="launch N processes with Accelerate, all machines together (default: 1)",
    )
    p.add_argument(
        "--distributed",
        choices=["ddp", "fsdp", "zero3"],
        default="ddp",
        help="engine of a launch of several processes: recipes/accelerate/{ddp,fsdp,deepspeed-zero3}.yaml "
        "(default: ddp; zero3 needs pip install 'moetune[deepspeed]')",
    )
    p.add_argument(
        "--num-machines",
        type=int,
        default=1,
        help="machines taking part, each running this command (default: 1)",
    )
    p.add_argument("--machine-rank", type=int, default=0, help="this machine's rank, 0..N-1 (default: 0)")
    p.add_argument(
        "--main-process-ip",
        default=None,
        help="machine 0's address, needed with --num-machines > 1 (default: none)",
    )
    p.add_argument(
        "--main-process-port",
        type=int,
        default=None,
        help="a free port on machine 0, needed with --num-machines > 1 (default: a free port on this machine)",
    )

    add("recipes", cmd_recipes, "list the bundled recipes")

    p = add("evaluate", cmd_evaluate, "held-out loss and task metrics of MODEL (+ adapter) on data")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--adapter", default=None, help="adapter folder to apply (default: none)")
    p.add_argument("--data", required=True, help="a data source, as data.train takes it (required)")
    p.add_argument(
        "--format",
        default=None,
        choices=["text", "instruction", "chat", "multimodal"],
        help="data.format (default: the adapter's recipe's, else inferred from the records)",
    )
    p.add_argument(
        "--metrics",
        default="loss",
        help="comma list of loss, exact_match, word_accuracy, macro_f1, recall_at_1 (default: loss)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="examples per batch (default: the adapter's recipe's, else 8)",
    )
    p.add_argument("--max-examples", type=int, default=None, help="use at most N records (default: all)")
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="tokens per example (default: the adapter's recipe's, else 1024)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=32,
        help="generation budget of exact_match / word_accuracy (default: 32)",
    )
    p.add_argument("--quantize", choices=QUANTIZE_METHODS, default=None, help=QUANTIZE_HELP)
    p.add_argument(
        "--trust-remote-code", action="store_true", help="run the model repository's own code (default: off)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (default: one line)")

    p = add(
        "lm-eval", cmd_lm_eval, "lm-evaluation-harness tasks on MODEL (+ adapter); needs moetune[lm-eval]"
    )
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--adapter", default=None, help="adapter folder to apply (default: none)")
    p.add_argument(
        "--tasks",
        required=True,
        help="comma list of harness task names and/or task YAML files or folders (required)",
    )
    p.add_argument("--limit", type=int, default=None, help="documents per task at most (default: all)")
    p.add_argument("--batch-size", type=int, default=8, help="requests per batch (default: 8)")
    p.add_argument(
        "--bootstrap-iters",
        type=int,
        default=100000,
        help="resamples for the standard errors; 0 skips them (default: 100000, the harness's)",
    )
    p.add_argument("--quantize", choices=QUANTIZE_METHODS, default=None, help=QUANTIZE_HELP)
    p.add_argument(
        "--trust-remote-code", action="store_true", help="run the model repository's own code (default: off)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (default: a table)")

    p = add("sweep", cmd_sweep, "train a recipe over a grid: held-out gain vs trainable parameters")
    p.add_argument("recipe", help="recipe YAML (a path or a bundled recipe name)")
    p.add_argument(
        "--grid",
        action="append",
        required=True,
        metavar="KEY=V1,V2",
        help="a recipe key and its values, repeatable, e.g. adapter.r=2,4,8,16 or "
        "adapter.experts.threshold=0.5,0.8,1.0 (required)",
    )
    p.add_argument(
        "--output", default=None, help="sweep folder (default: runs/sweep-<the recipe's output.dir name>)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key for every point, repeatable (default: none)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (default: a table)")

    experts = sub.add_parser(
        "experts",
        help="expert statistics and selection",
        description="expert statistics and selection",
        epilog=f"example:\n  {EXAMPLES['experts']}",
        formatter_class=_HelpFormatter,
    )
    experts_sub = experts.add_subparsers(dest="experts_command", required=True, metavar="COMMAND")
    p = experts_sub.add_parser(
        "profile",
        help="per-layer expert load on data, and an ESFT selection",
        description="per-layer expert load on data, and an ESFT selection",
        epilog=f"example:\n  {EXAMPLES['experts profile']}",
        formatter_class=_HelpFormatter,
    )
    p.set_defaults(handler=cmd_experts_profile)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--data", required=True, help="jsonl (text field) / text file or folder (required)")
    p.add_argument(
        "--output",
        required=True,
        help="folder for expert_stats.json, expert_load.png, selection.json (required)",
    )
    p.add_argument(
        "--threshold", type=float, default=0.2, help="cumulative share p for the selection (default: 0.2)"
    )
    p.add_argument("--metric", default="token_ratio", help="token_ratio | gate_score (default: token_ratio)")
    p.add_argument(
        "--max-examples", type=int, default=256, help="windows of text to run at most (default: 256)"
    )
    p.add_argument("--max-length", type=int, default=512, help="tokens per window (default: 512)")
    p.add_argument("--quantize", choices=QUANTIZE_METHODS, default=None, help=QUANTIZE_HELP)

    p = add(
        "export-adapter",
        cmd_export_adapter,
        "re-write an adapter in another layout: compact storage, or what vLLM / SGLang load",
    )
    p.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--output", required=True, help="folder to write (required)")
    p.add_argument(
        "--format",
        default="per-expert",
        choices=["per-expert", "peft", "vllm", "sglang"],
        help=f"{EXPORT_FORMATS} (default: per-expert)",
    )
    p.add_argument(
        "--base",
        default=None,
        help="vllm / sglang: the base MODEL; its config decides the layout "
        "(default: the adapter's base_model_name_or_path when it is a local folder)",
    )
    p.add_argument(
        "--rank",
        type=int,
        default=None,
        help="vllm / sglang: pad every pair to this rank (default: the largest)",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="vllm / sglang: run verify-export now, needs --base (default: off)",
    )

    p = add("verify-export", cmd_verify_export, "check that a vllm / sglang export equals base + adapter")
    p.add_argument("export", help="folder written by export-adapter --format vllm|sglang")
    p.add_argument("--base", required=True, help="the base MODEL (required)")
    p.add_argument("--adapter", required=True, help="the adapter folder it was exported from (required)")
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="share of max(1, largest |logit|) (default: 1e-4)",
    )

    p = add("merge", cmd_merge, "fold an adapter into its base and write a full model")
    p.add_argument("model", help="the base: a local model folder or a hub id")
    p.add_argument("--adapter", required=True, help="adapter folder (required)")
    p.add_argument("--output", required=True, help="folder to write; must be new or empty (required)")
    p.add_argument(
        "--verify", action="store_true", help="compare logits of base+adapter and merged (default: off)"
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="for --verify: absolute max |logit difference| (default: by dtype)",
    )
    p.add_argument("--max-shard-size", default=None, help="e.g. 2GB (default: keep the base's sharding)")

    p = add("verify-merge", cmd_verify_merge, "check that a merged model equals base + adapter")
    p.add_argument("model", help="the base: a local model folder or a hub id")
    p.add_argument("--adapter", required=True, help="adapter folder (required)")
    p.add_argument("--merged", required=True, help="merged model folder (required)")
    p.add_argument(
        "--tolerance", type=float, default=None, help="absolute max |logit difference| (default: by dtype)"
    )

    p = add("merge-adapters", cmd_merge_adapters, "combine adapters trained on the same base")
    p.add_argument(
        "--adapter", action="append", required=True, help="an adapter folder; repeat for each (required)"
    )
    p.add_argument("--output", required=True, help="folder to write (required)")
    p.add_argument(
        "--method", default="linear", help="linear | ties | dare_linear | dare_ties | svd (default: linear)"
    )
    p.add_argument("--weights", default=None, help="comma list, one per adapter (default: 1 each)")
    p.add_argument("--density", type=float, default=0.5, help="kept share for ties / dare (default: 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of dare's random drop (default: 0)")

    p = add("push", cmd_push, "upload an adapter or model folder to the Hugging Face Hub")
    p.add_argument("folder", help="adapter or merged-model folder")
    p.add_argument("--repo-id", required=True, help="Hub repo, OWNER/NAME (required)")
    p.add_argument("--private", action="store_true", help="create the repo private (default: public)")
    p.add_argument("--revision", default=None, help="branch to push to (default: main)")
    p.add_argument("--dry-run", action="store_true", help="list and validate, upload nothing (default: off)")
    p.add_argument(
        "--base-model",
        default=None,
        help="Hub id of the base for the card and adapter_config.json (default: the one the folder names, if a Hub id)",
    )
    p.add_argument(
        "--license",
        default=None,
        help="license for the card, e.g. apache-2.0 (default: the card's, else other)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Weight-loading progress bars are noise on a command line; the training loop draws its own.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    from adapters.errors import MoetuneError

    try:
        args.handler(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below, not at exit
    except MoetuneError as err:
        if debug:
            raise
        print(f"moetune: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("moetune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`moetune info --json | head -1`): not an error of ours. Point stdout at
        # /dev/null so the interpreter's final flush does not raise again (Python's documented recipe).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a process ended by a closed pipe
    return 0


if __name__ == "__main__":
    sys.exit(main())
