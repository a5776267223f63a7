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


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _floats(value: str) -> list[float]:
    return [float(v) for v in _csv(value)]


# ----------------------------------------------------------------------------- model commands


def cmd_init_model(args: argparse.Namespace) -> None:
    from finetune.loading import init_model

    path = init_model(
        args.preset,
        args.output,
        attention=args.attention,
        modalities=_csv(args.modalities) if args.modalities else None,
        seed=args.seed,
    )
    print(f"wrote a random-initialised '{args.preset}' model and its tokenizer to {path}")


def cmd_info(args: argparse.Namespace) -> None:
    from finetune.info import format_info, model_info

    info = model_info(args.model)
    print(json.dumps(info, indent=2) if args.json else format_info(info))


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
            trust_remote_code=args.trust_remote_code,
            allow_pickle=args.allow_pickle,
        )
    )


def cmd_plan(args: argparse.Namespace) -> None:
    from finetune.plan import format_plan, plan_memory

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
    )
    print(json.dumps(plan.as_dict(), indent=2) if args.json else format_plan(plan))


# ----------------------------------------------------------------------------- training


def cmd_train(args: argparse.Namespace) -> None:
    from finetune.train import launch_training

    summary = launch_training(
        args.recipe,
        overrides=args.set,
        output_dir=args.output,
        resume=args.resume,
        overwrite=args.overwrite,
        num_processes=args.num_processes,
        debug=args.debug,
    )
    if summary:
        print(summary)


def cmd_recipes(args: argparse.Namespace) -> None:
    from finetune.recipe import list_recipes

    for name, description in list_recipes():
        print(f"{name:<28} {description}")


def cmd_experts_profile(args: argparse.Namespace) -> None:
    from finetune.evaluate import profile_experts

    report = profile_experts(
        args.model,
        data=args.data,
        output=args.output,
        threshold=args.threshold,
        metric=args.metric,
        max_examples=args.max_examples,
        max_length=args.max_length,
    )
    print(report)


# ----------------------------------------------------------------------------- adapters


def cmd_export_adapter(args: argparse.Namespace) -> None:
    from adapters.export import export_adapter

    print(export_adapter(args.adapter, args.output, fmt=args.format))


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
    from adapters.merge import verify_merge
    from finetune.loading import resolve_model_folder

    print(verify_merge(resolve_model_folder(args.model), args.adapter, args.merged, tolerance=args.tolerance))


def cmd_merge_adapters(args: argparse.Namespace) -> None:
    from adapters.merge import combine_adapters

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
        )
    )


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moetune", description="LoRA fine-tuning for Mixture-of-Experts models."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable[[argparse.Namespace], None], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        p.set_defaults(handler=handler)
        return p

    p = add("init-model", cmd_init_model, "write a random-initialised built-in model + tokenizer")
    p.add_argument("--preset", required=True, help="tiny | small | full")
    p.add_argument("--output", required=True, help="folder to write")
    p.add_argument("--attention", default=None, help="dense | hierarchical_sparse (all layers)")
    p.add_argument("--modalities", default=None, help="comma list of image,audio,text encoders")
    p.add_argument("--seed", type=int, default=0)

    p = add("info", cmd_info, "architecture table and adaptable module groups of MODEL")
    p.add_argument("model", help="preset:NAME, a local folder, or a hub id")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = add("generate", cmd_generate, "generate text from a prompt")
    p.add_argument("model")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--adapter", default=None, help="adapter folder to apply")
    p.add_argument("--image", default=None, help="image file (multimodal models)")
    p.add_argument("--audio", default=None, help="audio file (multimodal models)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")
    p.add_argument("--allow-pickle", action="store_true", help="load pickle (.bin) weights you trust")

    p = add("plan", cmd_plan, "per-GPU memory plan for LoRA training of MODEL on N GPUs")
    p.add_argument("model")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--targets", default="attention,experts", help="comma list of target groups")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--no-checkpointing", action="store_true", help="plan without gradient checkpointing")
    p.add_argument("--json", action="store_true")

    p = add("train", cmd_train, "fine-tune LoRA adapters from a recipe")
    p.add_argument("recipe", help="recipe YAML (a path or a bundled recipe name)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.add_argument("--output", default=None, help="run folder (default: the recipe's output.dir)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in the run folder")
    p.add_argument("--num-processes", type=int, default=1, help="launch N processes with Accelerate")

    add("recipes", cmd_recipes, "list the bundled recipes")

    experts = sub.add_parser("experts", help="expert statistics and selection")
    experts_sub = experts.add_subparsers(dest="experts_command", required=True, metavar="COMMAND")
    p = experts_sub.add_parser("profile", help="per-layer expert load on data, and an ESFT selection")
    p.set_defaults(handler=cmd_experts_profile)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("model")
    p.add_argument("--data", required=True, help="jsonl / text file or folder")
    p.add_argument("--output", required=True)
    p.add_argument("--threshold", type=float, default=0.2, help="cumulative share p for the selection")
    p.add_argument("--metric", default="token_ratio", help="token_ratio | gate_score")
    p.add_argument("--max-examples", type=int, default=256)
    p.add_argument("--max-length", type=int, default=512)

    p = add("export-adapter", cmd_export_adapter, "re-write an adapter in another layout")
    p.add_argument("adapter")
    p.add_argument("--output", required=True)
    p.add_argument("--format", default="per-expert", help="per-expert")

    p = add("merge", cmd_merge, "fold an adapter into its base and write a full model")
    p.add_argument("model")
    p.add_argument("--adapter", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--verify", action="store_true", help="compare logits of base+adapter and merged")
    p.add_argument("--tolerance", type=float, default=None)
    p.add_argument("--max-shard-size", default=None, help="e.g. 2GB (default: keep the base's sharding)")

    p = add("verify-merge", cmd_verify_merge, "check that a merged model equals base + adapter")
    p.add_argument("model")
    p.add_argument("--adapter", required=True)
    p.add_argument("--merged", required=True)
    p.add_argument("--tolerance", type=float, default=None)

    p = add("merge-adapters", cmd_merge_adapters, "combine adapters trained on the same base")
    p.add_argument("--adapter", action="append", required=True, help="repeat for each adapter")
    p.add_argument("--output", required=True)
    p.add_argument("--method", default="linear", help="linear | ties | dare_linear | dare_ties | svd")
    p.add_argument("--weights", default=None, help="comma list, one per adapter")
    p.add_argument("--density", type=float, default=0.5, help="kept share for ties / dare")
    p.add_argument("--seed", type=int, default=0)

    p = add("push", cmd_push, "upload an adapter or model folder to the Hugging Face Hub")
    p.add_argument("folder")
    p.add_argument("--repo-id", required=True)
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", default=None)
    p.add_argument("--dry-run", action="store_true", help="list and validate, upload nothing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Weight-loading progress bars are noise on a command line; the training loop draws its own.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    from adapters.errors import MoetuneError

    try:
        args.handler(args)
    except MoetuneError as err:
        if debug:
            raise
        print(f"moetune: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("moetune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
