"""The recipe schema: one dataclass per section (model / adapter / data / train / output / eval).

Each field is a recipe key, documented in `metadata["help"]`; `describe_keys` / `keys_markdown`
turn them into the reference table of docs/recipes-and-data.md (`python -m finetune.recipe`), so the
docs cannot drift from the code. The rules that span fields (what is required, what cannot be set
together) are named here too; finetune/recipe/validation.py applies them.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


def _doc(text: str, **kwargs: Any) -> Any:
    """A dataclass field with its documentation attached (shown by `describe_keys`)."""
    return field(metadata={"help": text}, **kwargs)


# ----------------------------------------------------------------------------- sections


@dataclass
class ModelSection:
    """The base model and how it is loaded."""

    name: str = _doc(
        "MODEL spec: `preset:NAME` (built-in, random init), a local folder, or a hub id. Required."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _doc(
        "weight dtype of the base model; `auto` keeps the checkpoint's own dtype", default="auto"
    )
    gradient_checkpointing: bool = _doc("recompute activations in backward to save memory", default=False)
    trust_remote_code: bool = _doc(
        "run Python code shipped with a hub model (off unless you trust it)", default=False
    )
    allow_pickle: bool = _doc(
        "allow pickle-based weight files (.bin/.pt); safetensors only when false", default=False
    )
    modalities: list[Literal["image", "audio", "text"]] | None = _doc(
        "modality encoders to build into a `preset:NAME` model (as `init-model --modalities`); null = text only",
        default=None,
    )
    quantize: Literal["int8", "nf4"] | None = _doc(
        "store the routed experts quantized (QLoRA for MoE): `int8` (per output row) or `nf4` (blocks of 64); "
        "LoRA trains in the compute dtype on top, and the adapter is a plain PEFT adapter of the float base. "
        "null = experts in model.dtype",
        default=None,
    )
    experts_backend: Literal["auto", "loop", "grouped"] = _doc(
        "how routed experts compute: `auto` (grouped GEMMs on CUDA GPUs, a loop over the experts that "
        "received tokens on CPUs), `loop`, or `grouped` (CUDA only; quantized experts in chunks of dequantized experts)",
        default="auto",
    )


@dataclass
class AdapterSection:
    """The LoRA adapter: the keys of `adapters.apply_lora`."""

    targets: list[str] = _doc(
        "groups (attention, experts, shared_experts, dense_mlp, router, encoders, projector) "
        "and/or raw module or parameter names; one name may be given as a plain string",
        default_factory=lambda: ["attention", "experts"],
    )
    r: int = _doc("LoRA rank", default=16)
    alpha: int | float = _doc(
        "LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)", default=32
    )
    dropout: float = _doc("LoRA dropout on attention / linear targets (expert LoRA needs 0)", default=0.0)
    layers: list[int] | str | None = _doc(
        "decoder layers to adapt: a list of indices or an inclusive range 'START-END'; null = all layers",
        default=None,
    )
    experts: dict[int, list[int]] | dict[str, Any] | str | None = _doc(
        "routed experts to adapt: null = all, a mapping layer -> expert ids, the path of the "
        "selection.json written by `moetune experts profile`, or ESFT in the run: {threshold: P, data: SOURCE, "
        "metric: token_ratio | gate_score, max_examples: N} profiles the loaded model's routing on SOURCE "
        "(default: the training data; metric token_ratio, 256 examples) and keeps per layer the experts "
        "whose share adds up to P (RUN/selection.json + selection.png)",
        default=None,
    )
    router: Literal["frozen", "train", "lora"] = _doc(
        "the router (gate): frozen, fully trained, or adapted with LoRA", default="frozen"
    )
    use_rslora: bool = _doc("rank-stabilised LoRA scaling alpha / sqrt(r)", default=False)
    group_overrides: dict[str, dict[str, Any]] | None = _doc(
        "per-group settings, e.g. {experts: {r: 8, alpha: 16}}; keys are group names", default=None
    )


@dataclass
class DataSection:
    """Where the examples come from and how they become token sequences."""

    train: str | list[str] = _doc(
        "training data: a .jsonl/.json/.csv/.parquet file, a text/code file, a glob, a folder (text/code "
        "files, or a dataset saved with `save_to_disk`), a hub dataset id (`owner/name` or "
        "`owner/name:split`), `stdlib:python` (this Python's standard library sources), or a list of these. "
        "Required."
    )
    eval: str | list[str] | None = _doc("held-out data, same forms as data.train", default=None)
    retain: str | list[str] | None = _doc(
        "general-domain data, same forms as data.train (format inferred from its records): its loss before "
        "and after training (retain_loss_before / _after) shows what the adaptation cost elsewhere",
        default=None,
    )
    eval_fraction: float | None = _doc(
        "hold out this share of data.train (by record, seeded with train.seed) instead of data.eval",
        default=None,
    )
    format: Literal["text", "instruction", "chat", "multimodal", "preference"] | None = _doc(
        "text: loss on every token; instruction: loss on the response only; chat: loss on assistant "
        "turns only; multimodal: records with image / audio (finetune.data.multimodal); preference: "
        "prompt + chosen + rejected records for train.method dpo / orpo / simpo; null = inferred "
        "from the records' fields (messages -> chat, prompt + response or Alpaca's instruction + output -> "
        "instruction, text -> text, prompt + chosen + rejected -> preference; the choice is printed)",
        default=None,
    )
    max_length: int = _doc(
        "tokens per example; longer examples are truncated (the count is reported), or with packing, "
        "text documents are split across rows",
        default=1024,
    )
    packing: bool = _doc(
        "pack examples into rows of max_length tokens; position ids restart at every document and "
        "attention stays within it",
        default=False,
    )
    group_by_length: bool = _doc(
        "length bucketing: batch examples of similar length together (less padding)", default=False
    )
    pad_to_multiple_of: int | None = _doc("pad each batch to a multiple of this length", default=None)
    text_field: str = _doc("record field holding the text (format text, multimodal)", default="text")
    prompt_field: str = _doc(
        "record field holding the prompt (format instruction); records with Alpaca's instruction / input / "
        "output fields and no prompt field are read as instruction + input -> output",
        default="prompt",
    )
    response_field: str = _doc("record field holding the response (format instruction)", default="response")
    separator: str = _doc("text placed between prompt and response (format instruction)", default="\n")
    input_field: str | None = _doc(
        "record field appended to the prompt on a new line when present and not empty (Alpaca's input; "
        "format instruction); null = none",
        default="input",
    )
    messages_field: str = _doc(
        "record field holding a list of {role, content} messages (format chat)", default="messages"
    )
    chat_template: str | None = _doc(
        "null = the tokenizer's chat template; `simple` = moetune's documented default "
        "(<|role|> lines); anything else = a Jinja template",
        default=None,
    )
    image_field: str = _doc("record field holding an image path (format multimodal)", default="image")
    audio_field: str = _doc("record field holding an audio path (format multimodal)", default="audio")
    target_field: str = _doc(
        "record field holding the text to generate (format multimodal)", default="target"
    )
    labels_field: str = _doc("record field holding class labels (format multimodal)", default="labels")
    multimodal: dict[str, Any] | None = _doc(
        "more options of format multimodal, checked by finetune.data.multimodal.MultimodalOptions "
        "(verify_media, prompt, text_to_decoder, label_names, audio_max_seconds, cache_dir, ignore_modalities)",
        default=None,
    )
    on_bad_record: Literal["fail", "skip"] = _doc(
        "a record with a missing or malformed field, or a malformed JSON line: fail with its number, or "
        "skip it (counted and reported)",
        default="fail",
    )
    max_examples: int | None = _doc("use at most this many training records (after the split)", default=None)
    max_eval_examples: int | None = _doc("use at most this many eval records", default=None)


@dataclass
class TrainSection:
    """The optimisation loop."""

    max_steps: int | None = _doc("optimizer steps to run (set this or epochs)", default=None)
    epochs: int | None = _doc(
        "passes over the training data; 1 when neither this nor max_steps is set", default=None
    )
    batch_size: int = _doc("examples per device per micro-batch", default=8)
    grad_accum: int = _doc("micro-batches per optimizer step", default=1)
    lr: float = _doc("peak learning rate (AdamW)", default=2e-4)
    weight_decay: float = _doc("AdamW weight decay", default=0.0)
    warmup_steps: int | None = _doc("linear warmup steps (set this or warmup_fraction)", default=None)
    warmup_fraction: float | None = _doc(
        "warmup as a share of all steps (set this or warmup_steps)", default=None
    )
    schedule: Literal["cosine", "linear", "constant"] = _doc(
        "learning-rate decay after warmup", default="cosine"
    )
    max_grad_norm: float | None = _doc("clip the gradient norm to this; null = no clipping", default=1.0)
    seed: int = _doc("seed for initialisation, data order and the eval split", default=0)
    eval_every: int | None = _doc(
        "evaluate every N steps (eval also runs before and after training when there is eval data)",
        default=None,
    )
    save_every: int | None = _doc(
        "save a resumable checkpoint every N steps; a checkpoint is always saved at the end (null = at "
        "the end only)",
        default=None,
    )
    log_every: int = _doc("log loss / lr / throughput every N steps", default=10)
    mixed_precision: Literal["no", "bf16", "fp16"] = _doc(
        "autocast precision for the forward pass", default="no"
    )
    nan_policy: Literal["stop", "skip"] = _doc(
        "a NaN/inf loss or gradient: stop naming the step, or skip that step", default="stop"
    )
    eval_batches: int | None = _doc(
        "evaluate on at most this many batches; null = the whole eval set", default=None
    )
    method: Literal["sft", "dpo", "orpo", "simpo"] = _doc(
        "the objective: sft (next-token loss on the labels), or a preference objective on "
        "data.format: preference records: dpo (reference = the base, i.e. the adapter disabled), orpo, simpo",
        default="sft",
    )
    preference: dict[str, Any] | None = _doc(
        "settings of train.method dpo (beta 0.1, loss_type sigmoid | hinge | ipo | robust, label_smoothing 0), "
        "orpo (lambda 0.1) or simpo (beta 2.0, gamma 0.5, label_smoothing 0); e.g. {beta: 0.2}; "
        "null = those defaults",
        default=None,
    )


@dataclass
class EvalSection:
    """What a run measures on the held-out data, before training, every train.eval_every steps and after."""

    metrics: list[Literal["loss", "exact_match", "word_accuracy", "macro_f1", "recall_at_1"]] = _doc(
        "loss (held-out loss, always measured when there is eval data); exact_match / word_accuracy (greedy "
        "generation of each example's target after its prompt: instruction, chat, multimodal targets); "
        "macro_f1 (the multi-label head); recall_at_1 (image <-> text retrieval over the eval pairs). "
        "metrics.json gets eval_<metric>_before / _after",
        default_factory=lambda: ["loss"],
    )
    batch_size: int | None = _doc(
        "examples per batch for the task metrics (generation is batched); null = train.batch_size",
        default=None,
    )
    max_examples: int | None = _doc(
        "compute the task metrics on at most this many eval examples (the loss follows train.eval_batches); "
        "null = all",
        default=None,
    )
    max_new_tokens: int = _doc("tokens generated per example for exact_match / word_accuracy", default=32)


@dataclass
class OutputSection:
    """Where the run goes."""

    dir: str | None = _doc("run folder; default runs/<recipe name>", default=None)
    push_to_hub: str | None = _doc(
        "push the adapter to this hub repo id at the end; null = don't", default=None
    )
    private: bool = _doc("create the hub repo private (needs push_to_hub)", default=False)
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = _doc(
        "trackers to log to (wandb / mlflow when installed)", default_factory=lambda: ["tensorboard"]
    )
    keep_checkpoints: int | None = _doc("keep the newest N checkpoints; null = keep all", default=2)


@dataclass
class Recipe:
    """A whole recipe. `load_recipe` builds it; `recipe_to_dict` / `save_recipe` write it back."""

    model: ModelSection
    adapter: AdapterSection
    data: DataSection
    train: TrainSection
    output: OutputSection
    eval: EvalSection = field(default_factory=EvalSection)
    # What loading decided for the user, one line each, printed by the training loop; not part of the
    # recipe itself. notes: defaults a run relies on, sample data found in the installation (stdout);
    # warnings: overrides that replaced a key of the recipe file (stderr).
    notes: list[str] = field(default_factory=list, compare=False, repr=False)
    warnings: list[str] = field(default_factory=list, compare=False, repr=False)


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "adapter": AdapterSection,
    "data": DataSection,
    "train": TrainSection,
    "output": OutputSection,
    "eval": EvalSection,
}
REQUIRED = ("model.name", "data.train")
# Keys whose value must not be empty when given (a default exists for when they are left out).
NOT_EMPTY = ("adapter.targets",)
# Defaults worth a line when a recipe leaves them out: they decide what is trained, on what, how long.
HEADLINE_DEFAULTS = (
    "adapter.targets",
    "adapter.r",
    "adapter.alpha",
    "data.max_length",
    "train.epochs",
    "train.batch_size",
    "train.lr",
    "output.dir",
)
# Pairs of keys that cannot both be set: an override of one replaces the other's recipe value.
EXCLUSIVE = (
    ("train.max_steps", "train.epochs"),
    ("train.warmup_steps", "train.warmup_fraction"),
    ("data.eval", "data.eval_fraction"),
    ("data.packing", "data.group_by_length"),
)
# A key given as one value where the recipe keeps a list.
ONE_OR_LIST = ("adapter.targets",)

# Lower bounds (inclusive) and open ranges, checked after types.


ESFT_KEYS = ("threshold", "data", "metric", "max_examples")


def esft_profile(experts: Any) -> dict[str, Any] | None:
    """`adapter.experts` when it asks for ESFT in the run ({threshold: ..}), else None."""
    if isinstance(experts, dict) and any(isinstance(k, str) for k in experts):
        return experts
    return None


def get_key(recipe: Recipe, path: str) -> Any:
    """The value of a key path (`train.lr`) of a recipe."""
    section, key = path.split(".")
    return getattr(getattr(recipe, section), key)


def recipe_to_dict(recipe: Recipe) -> dict[str, dict[str, Any]]:
    """The recipe as plain YAML-ready data, every key present (defaults included)."""
    return {name: dataclasses.asdict(getattr(recipe, name)) for name in SECTIONS}


# ----------------------------------------------------------------------------- types and docs


UNION_TYPES = (typing.Union, types.UnionType)


_NAMES = {
    str: ("a string", "strings"),
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    bool: ("true or false", "booleans"),
    Any: ("any value", "values"),
}


def type_name(tp: Any, plural: bool = False) -> str:
    """How errors and the docs name a field type: `a list of strings`, `cosine | linear | constant`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(str(a) for a in args) if not plural else f"({' | '.join(str(a) for a in args)})"
    if origin in UNION_TYPES:
        return " or ".join(type_name(a) for a in args)
    if origin is list:
        return f"a list of {type_name(args[0], plural=True)}"
    if origin is dict:
        return f"a mapping of {type_name(args[0], plural=True)} to {type_name(args[1], plural=True)}"
    return _NAMES[tp][plural]


def describe_keys() -> list[tuple[str, str, str, str]]:
    """(key path, type, default, help) for every recipe key: the reference table of the docs."""
    rows = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = json.dumps(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = json.dumps(f.default_factory())
            else:
                default = "required"
            rows.append((f"{section}.{f.name}", type_name(hints[f.name]), default, f.metadata["help"]))
    return rows


def keys_markdown() -> str:
    """The table of every recipe key, as docs/recipes-and-data.md shows it (`python -m finetune.recipe`)."""
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, type_text, default, help_text in describe_keys():
        kind, cell = (text.replace("|", "\\|") for text in (type_text, help_text))
        lines.append(f"| `{key}` | {kind} | `{default}` | {cell} |")
    return "\n".join(lines) + "\n"
