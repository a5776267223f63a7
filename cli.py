"""moetune command line: parse, call one public function, print. No logic lives here.

Each subcommand maps to one function in `finetune` or `adapters` (`HANDLERS`); what it accepts (its
options, help and example) is declared in cli_parser.py. Imports are lazy so that
`moetune info preset:full` or `moetune recipes` start fast. A `MoetuneError` (a user mistake)
becomes one line on stderr and exit code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

import cli_parser


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _floats(value: str) -> list[float]:
    return [float(v) for v in _csv(value)]


def _show(result: object, as_json: bool = False) -> None:
    """Print a library function's result object: its text (`str()`), or `as_dict()` as JSON."""
    print(json.dumps(result.as_dict(), indent=2) if as_json else result)


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
    _show(info, args.json)


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
    _show(plan, args.json)


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
    _show(result, args.json)


def cmd_sweep(args: argparse.Namespace) -> None:
    from finetune.evaluation.sweep import run_sweep

    result = run_sweep(args.recipe, args.grid, output=args.output, overrides=args.set)
    _show(result, args.json)


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
    _show(result, args.json)


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


# ----------------------------------------------------------------------------- the map

# Each subcommand and the handler that runs it; cli_parser.py declares what each one accepts.
HANDLERS: dict[str, Callable[[argparse.Namespace], None]] = {
    "init-model": cmd_init_model,
    "quantize": cmd_quantize,
    "info": cmd_info,
    "generate": cmd_generate,
    "plan": cmd_plan,
    "train": cmd_train,
    "recipes": cmd_recipes,
    "evaluate": cmd_evaluate,
    "lm-eval": cmd_lm_eval,
    "sweep": cmd_sweep,
    "experts profile": cmd_experts_profile,
    "export-adapter": cmd_export_adapter,
    "verify-export": cmd_verify_export,
    "merge": cmd_merge,
    "verify-merge": cmd_verify_merge,
    "merge-adapters": cmd_merge_adapters,
    "push": cmd_push,
}


def build_parser() -> argparse.ArgumentParser:
    """The `moetune` parser, each subcommand bound to its handler."""
    return cli_parser.build_parser(HANDLERS)


def main(argv: Sequence[str] | None = None) -> int:
    # Weight-loading progress bars are noise on a command line; the training loop draws its own.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    import finetune  # noqa: F401  (first: its CPU memory settings must precede torch; see finetune.cpu_memory)
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
