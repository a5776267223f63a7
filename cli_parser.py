"""What each `moetune` subcommand accepts: its options, their help and defaults, and an example.

Only argparse declarations live here; which function each subcommand calls, and what it prints, is in
cli.py. Options that several subcommands share (the model, --adapter, --quantize, --set, --json ...)
are declared once, by the helpers below, so that their spelling, default and help agree everywhere.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping

QUANTIZE_METHODS = ("int8", "nf4")  # finetune.quantization.formats.METHODS (not imported: a lazy CLI)
QUANTIZE_HELP = "store the routed experts int8 / nf4 (default: as the checkpoint stores them)"


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
RECIPE_HELP = "recipe YAML (a path or a bundled recipe name)"
NEW_FOLDER_HELP = "folder to write; must be new or empty (required)"


def _flag(p: argparse.ArgumentParser, name: str, help: str) -> None:
    """An on/off option; off unless given."""
    p.add_argument(name, action="store_true", help=f"{help} (default: off)")


def _model(p: argparse.ArgumentParser, help: str = MODEL_HELP) -> None:
    p.add_argument("model", help=help)


def _adapter(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", help="adapter folder to apply (default: none)")


def _quantize(p: argparse.ArgumentParser, help: str = QUANTIZE_HELP) -> None:
    p.add_argument("--quantize", choices=QUANTIZE_METHODS, help=help)


def _trust_remote_code(p: argparse.ArgumentParser) -> None:
    _flag(p, "--trust-remote-code", "run the model repository's own code")


def _json(p: argparse.ArgumentParser, otherwise: str = "a table") -> None:
    p.add_argument("--json", action="store_true", help=f"print one JSON object (default: {otherwise})")


def _overrides(p: argparse.ArgumentParser, help: str = "override a recipe key, repeatable") -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=f"{help} (default: none)")


def _tolerance(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--tolerance", type=float, help=help)


def build_parser(handlers: Mapping[str, Callable[[argparse.Namespace], None]]) -> argparse.ArgumentParser:
    """The `moetune` parser; `handlers` maps each subcommand ("experts profile" for a nested one) to the
    function `cli.main` calls with its parsed arguments."""
    parser = argparse.ArgumentParser(
        prog="moetune",
        description="LoRA fine-tuning for Mixture-of-Experts models.",
        epilog="example:\n  moetune train quickstart\n\n`moetune COMMAND --help` shows each command's options.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors (default: off)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str, *, parent=sub, path: str | None = None, group: bool = False):
        """The subcommand `path` (default: `name`) with its example, bound to its handler unless it is a
        `group` of subcommands (`experts`)."""
        p = parent.add_parser(
            name,
            help=help,
            description=help,
            epilog=f"example:\n  {EXAMPLES[path or name]}",
            formatter_class=_HelpFormatter,
        )
        if not group:
            p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            p.set_defaults(handler=handlers[path or name])
        return p

    p = add("init-model", "write a random-initialised built-in model + tokenizer")
    p.add_argument("--preset", required=True, help="tiny | small | full (required)")
    p.add_argument("--output", required=True, help=NEW_FOLDER_HELP)
    p.add_argument(
        "--attention", help="dense | hierarchical_sparse, for all layers (default: the preset's, dense)"
    )
    p.add_argument("--modalities", help="comma list of image,audio,text encoders (default: none, text-only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (default: 0)")
    _quantize(
        p,
        "write the routed experts int8 / nf4, block by block: how --preset full is made without GPUs "
        "(default: float experts)",
    )

    p = add("quantize", "write MODEL with its routed experts stored int8 or nf4")
    _model(p, "a float model: a local folder, a hub id, or preset:NAME")
    p.add_argument(
        "--method",
        required=True,
        choices=QUANTIZE_METHODS,
        help="int8 (per row) or nf4 (blocks of 64) (required)",
    )
    p.add_argument("--output", required=True, help=NEW_FOLDER_HELP)
    p.add_argument("--dtype", help="dtype of the other weights (default: the checkpoint's)")
    p.add_argument("--max-shard-size", help="safetensors shard size (default: 2GB)")
    _trust_remote_code(p)

    p = add("info", "architecture table and adaptable module groups of MODEL (or an adapter's summary)")
    _model(p, MODEL_HELP + "; an adapter folder prints what it adapts and its base")
    _json(p)
    _quantize(
        p, "also show the bytes with the routed experts int8 / nf4 (default: as the checkpoint stores them)"
    )

    p = add("generate", "generate text from a prompt (greedy unless --temperature > 0)")
    _model(p)
    p.add_argument("--prompt", required=True, help="the prompt text (required)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="new tokens at most (default: 32)")
    _adapter(p)
    layout = p.add_mutually_exclusive_group()
    chat_help = "render the prompt as a user message with the chat template (default: the adapter's training "
    chat_help += "layout, else the chat template when the tokenizer has one)"
    layout.add_argument("--chat", dest="chat", action="store_const", const=True, help=chat_help)
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
    p.add_argument("--seed", type=int, help="seed for sampling, repeatable output (default: none)")
    p.add_argument("--image", help="image file, multimodal models (default: none)")
    p.add_argument("--audio", help="audio file, multimodal models (default: none)")
    _trust_remote_code(p)
    _flag(p, "--allow-pickle", "load pickle (.bin) weights you trust")
    _quantize(p)

    p = add("plan", "per-GPU memory plan for LoRA training of MODEL on N GPUs")
    _model(p, MODEL_HELP + " (only its config is read)")
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
    _quantize(p)
    p.add_argument(
        "--strategy",
        choices=["auto", "ddp", "fsdp", "zero3"],
        default="auto",
        help="how the weights are spread (default: auto: ddp, or fsdp when replicas do not fit)",
    )
    _json(p)

    p = add("train", "fine-tune LoRA adapters from a recipe")
    p.add_argument("recipe", help=RECIPE_HELP)
    _overrides(p)
    p.add_argument("--output", help="run folder (default: the recipe's output.dir)")
    _flag(p, "--resume", "continue from the last checkpoint")
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
        "--main-process-ip", help="machine 0's address, needed with --num-machines > 1 (default: none)"
    )
    p.add_argument(
        "--main-process-port",
        type=int,
        help="a free port on machine 0, needed with --num-machines > 1 (default: a free port on this machine)",
    )

    add("recipes", "list the bundled recipes")

    p = add("evaluate", "held-out loss and task metrics of MODEL (+ adapter) on data")
    _model(p)
    _adapter(p)
    p.add_argument("--data", required=True, help="a data source, as data.train takes it (required)")
    p.add_argument(
        "--format",
        choices=["text", "instruction", "chat", "multimodal"],
        help="data.format (default: the adapter's recipe's, else inferred from the records)",
    )
    p.add_argument(
        "--metrics",
        default="loss",
        help="comma list of loss, exact_match, word_accuracy, macro_f1, recall_at_1 (default: loss)",
    )
    p.add_argument(
        "--batch-size", type=int, help="examples per batch (default: the adapter's recipe's, else 8)"
    )
    p.add_argument("--max-examples", type=int, help="use at most N records (default: all)")
    p.add_argument(
        "--max-length", type=int, help="tokens per example (default: the adapter's recipe's, else 1024)"
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=32,
        help="generation budget of exact_match / word_accuracy (default: 32)",
    )
    _quantize(p)
    _trust_remote_code(p)
    _json(p, "one line")

    p = add("lm-eval", "lm-evaluation-harness tasks on MODEL (+ adapter); needs moetune[lm-eval]")
    _model(p)
    _adapter(p)
    p.add_argument(
        "--tasks",
        required=True,
        help="comma list of harness task names and/or task YAML files or folders (required)",
    )
    p.add_argument("--limit", type=int, help="documents per task at most (default: all)")
    p.add_argument("--batch-size", type=int, default=8, help="requests per batch (default: 8)")
    p.add_argument(
        "--bootstrap-iters",
        type=int,
        default=100000,
        help="resamples for the standard errors; 0 skips them (default: 100000, the harness's)",
    )
    _quantize(p)
    _trust_remote_code(p)
    _json(p)

    p = add("sweep", "train a recipe over a grid: held-out gain vs trainable parameters")
    p.add_argument("recipe", help=RECIPE_HELP)
    p.add_argument(
        "--grid",
        action="append",
        required=True,
        metavar="KEY=V1,V2",
        help="a recipe key and its values, repeatable, e.g. adapter.r=2,4,8,16 or "
        "adapter.experts.threshold=0.5,0.8,1.0 (required)",
    )
    p.add_argument("--output", help="sweep folder (default: runs/sweep-<the recipe's output.dir name>)")
    _overrides(p, "override a recipe key for every point, repeatable")
    _json(p)

    experts = add("experts", "expert statistics and selection", group=True)
    experts_sub = experts.add_subparsers(dest="experts_command", required=True, metavar="COMMAND")
    p = add(
        "profile",
        "per-layer expert load on data, and an ESFT selection",
        parent=experts_sub,
        path="experts profile",
    )
    _model(p)
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
    _quantize(p)

    p = add(
        "export-adapter",
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
        help="vllm / sglang: the base MODEL; its config decides the layout "
        "(default: the adapter's base_model_name_or_path when it is a local folder)",
    )
    p.add_argument(
        "--rank", type=int, help="vllm / sglang: pad every pair to this rank (default: the largest)"
    )
    _flag(p, "--verify", "vllm / sglang: run verify-export now, needs --base")

    p = add("verify-export", "check that a vllm / sglang export equals base + adapter")
    p.add_argument("export", help="folder written by export-adapter --format vllm|sglang")
    p.add_argument("--base", required=True, help="the base MODEL (required)")
    p.add_argument("--adapter", required=True, help="the adapter folder it was exported from (required)")
    _tolerance(p, "share of max(1, largest |logit|) (default: 1e-4)")

    p = add("merge", "fold an adapter into its base and write a full model")
    _model(p, "the base: a local model folder or a hub id")
    p.add_argument("--adapter", required=True, help="adapter folder (required)")
    p.add_argument("--output", required=True, help=NEW_FOLDER_HELP)
    _flag(p, "--verify", "compare logits of base+adapter and merged")
    _tolerance(p, "for --verify: absolute max |logit difference| (default: by dtype)")
    p.add_argument("--max-shard-size", help="e.g. 2GB (default: keep the base's sharding)")

    p = add("verify-merge", "check that a merged model equals base + adapter")
    _model(p, "the base: a local model folder or a hub id")
    p.add_argument("--adapter", required=True, help="adapter folder (required)")
    p.add_argument("--merged", required=True, help="merged model folder (required)")
    _tolerance(p, "absolute max |logit difference| (default: by dtype)")

    p = add("merge-adapters", "combine adapters trained on the same base")
    p.add_argument(
        "--adapter", action="append", required=True, help="an adapter folder; repeat for each (required)"
    )
    p.add_argument("--output", required=True, help="folder to write (required)")
    p.add_argument(
        "--method", default="linear", help="linear | ties | dare_linear | dare_ties | svd (default: linear)"
    )
    p.add_argument("--weights", help="comma list, one per adapter (default: 1 each)")
    p.add_argument("--density", type=float, default=0.5, help="kept share for ties / dare (default: 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of dare's random drop (default: 0)")

    p = add("push", "upload an adapter or model folder to the Hugging Face Hub")
    p.add_argument("folder", help="adapter or merged-model folder")
    p.add_argument("--repo-id", required=True, help="Hub repo, OWNER/NAME (required)")
    p.add_argument("--private", action="store_true", help="create the repo private (default: public)")
    p.add_argument("--revision", help="branch to push to (default: main)")
    _flag(p, "--dry-run", "list and validate, upload nothing")
    p.add_argument(
        "--base-model",
        help="Hub id of the base for the card and adapter_config.json (default: the one the folder names, if a Hub id)",
    )
    p.add_argument(
        "--license", help="license for the card, e.g. apache-2.0 (default: the card's, else other)"
    )
    return parser
