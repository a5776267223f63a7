"""Recipes: one YAML file with sections model / adapter / data / train / output.

Each section is a dataclass whose fields are the recipe keys, documented in `metadata["help"]`
(`moetune recipes` and docs/recipes-and-data.md show them). `load_recipe` reads a file or a bundled
recipe by name, applies `--set section.key=value` overrides (values parsed as YAML), checks types,
ranges and cross-field conflicts in one place (`_check_conflicts`), and refuses mistakes with a
`MoetuneError` that names the file, the key path and the fix; all the problems of a recipe are
reported together, one line each. Nothing is rewritten silently: the values filled in are documented
defaults, the recipe's `notes` say which ones a run relies on (printed when training starts; an
override that replaced a recipe key is one of its `warnings`, printed on stderr), and the
resolved recipe (`save_recipe`) shows them all.

An override wins over the recipe, as on the command line of the peers (torchtune, axolotl,
LLaMA-Factory): `--set train.max_steps=5` on a recipe with `train.epochs: 2` replaces the epochs
(the two cannot both be set) and a note says so; only keys the recipe sets conflict this way, two
overrides that contradict each other are still refused.

Relative paths in a recipe (data files, an experts selection.json, output.dir) are relative to the
directory `moetune` runs in, as for any command-line argument; the data paths of the bundled recipes
(`recipes/data/...`) are found next to the recipes when they are not there (`resolve_bundled_path`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import types
import typing
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from finetune.errors import MoetuneError

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
# Accelerate launch configs live under recipes/ too, but they are not training recipes.
NOT_RECIPES = ("accelerate",)


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
    experts: dict[int, list[int]] | str | None = _doc(
        "routed experts to adapt: null = all, a mapping layer -> expert ids, or the path of the "
        "selection.json written by `moetune experts profile`",
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
    eval_fraction: float | None = _doc(
        "hold out this share of data.train (by record, seeded with train.seed) instead of data.eval",
        default=None,
    )
    format: Literal["text", "instruction", "chat", "multimodal"] | None = _doc(
        "text: loss on every token; instruction: loss on the response only; chat: loss on assistant "
        "turns only; multimodal: records with image / audio (finetune.data.multimodal); null = inferred "
        "from the records' fields (messages -> chat, prompt + response or Alpaca's instruction + output -> "
        "instruction, text -> text; the choice is printed)",
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
    # What loading decided for the user, one line each, printed by the training loop; not part of the
    # recipe itself. notes: defaults a run relies on, sample data found in the installation (stdout);
    # warnings: overrides that replaced a key of the recipe file (stderr).
    notes: list[str] = field(default_factory=list, compare=False, repr=False)
    warnings: list[str] = field(default_factory=list, compare=False, repr=False)


SECTIONS: dict[str, type] = {
    "model": ModelSection, "adapter": AdapterSection, "data": DataSection, "train": TrainSection,
    "output": OutputSection,
}  # fmt: skip
REQUIRED = ("model.name", "data.train")
# Keys whose value must not be empty when given (a default exists for when they are left out).
NOT_EMPTY = ("adapter.targets",)
# Defaults worth a line when a recipe leaves them out: they decide what is trained, on what, how long.
HEADLINE_DEFAULTS = (
    "adapter.targets", "adapter.r", "adapter.alpha", "data.max_length", "train.epochs",
    "train.batch_size", "train.lr", "output.dir",
)  # fmt: skip
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
_AT_LEAST = {
    "adapter.r": 1, "data.max_length": 2, "data.pad_to_multiple_of": 1, "data.max_examples": 1,
    "data.max_eval_examples": 1, "train.max_steps": 1, "train.epochs": 1, "train.batch_size": 1,
    "train.grad_accum": 1, "train.weight_decay": 0, "train.warmup_steps": 0, "train.eval_every": 1,
    "train.save_every": 1, "train.log_every": 1, "train.eval_batches": 1, "output.keep_checkpoints": 1,
}  # fmt: skip
_POSITIVE = ("adapter.alpha", "train.lr", "train.max_grad_norm")
_UNIT_INTERVAL = {
    "adapter.dropout": "[0, 1)",
    "train.warmup_fraction": "[0, 1)",
    "data.eval_fraction": "(0, 1)",
}


# ----------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """YAML 1.1 safe loader that reads `1e-4` as a float (YAML 1.2 does; 1.1 needs `1.0e-4`) and
    refuses duplicate keys (YAML would silently keep the last one)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, Hashable):
            continue  # SafeLoader's own construct_mapping reports unhashable keys
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}; keep one", key_node.start_mark
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, where: str) -> Any:
    """YAML -> Python with moetune's loader; a syntax error becomes one line naming `where` and the line."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506  (a SafeLoader subclass)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = err.problem or err.context or "invalid YAML"
        fix = "" if "; " in problem else "; fix the YAML syntax"
        raise MoetuneError(f"{where}:{line}: {problem}{fix}") from err
    except yaml.YAMLError as err:
        raise MoetuneError(f"{where}: invalid YAML ({err}); fix the YAML syntax") from err


# ----------------------------------------------------------------------------- type checking


_UNIONS = (typing.Union, types.UnionType)


_NAMES = {str: ("a string", "strings"), int: ("an integer", "integers"), float: ("a number", "numbers"),
          bool: ("true or false", "booleans"), Any: ("any value", "values")}  # fmt: skip


def _type_name(tp: Any, plural: bool = False) -> str:
    """How errors and the docs name a field type: `a list of strings`, `cosine | linear | constant`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(str(a) for a in args) if not plural else f"({' | '.join(str(a) for a in args)})"
    if origin in _UNIONS:
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0], plural=True)}"
    if origin is dict:
        return f"a mapping of {_type_name(args[0], plural=True)} to {_type_name(args[1], plural=True)}"
    return _NAMES[tp][plural]


class _Mismatch(Exception):
    """Internal: a value does not fit a type."""


def _coerce(value: Any, tp: Any) -> Any:
    """`value` checked against `tp` (the field annotation); ints are accepted for floats and integral
    floats (`1e3`) for ints. Raises _Mismatch."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        if isinstance(value, bool) and value is False and "no" in args:  # YAML 1.1 reads `no` as false
            return "no"
        raise _Mismatch
    if origin in _UNIONS:
        for option in sorted(args, key=lambda a: a is not type(None)):  # null first, then the rest
            try:
                return _coerce(value, option)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is list:
        if not isinstance(value, list):
            raise _Mismatch
        return [_coerce(v, args[0]) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return {_coerce(k, args[0]): _coerce(v, args[1]) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Mismatch
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Mismatch
        if value != value or value in (float("inf"), float("-inf")):
            raise _Mismatch
        return float(value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"unsupported recipe field type {tp!r}")  # a bug in this file, not a user mistake


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _home_of(name: str) -> str | None:
    """The full key path of a key name in whichever section has it (`max_length` -> `data.max_length`)."""
    return next(
        (f"{s}.{name}" for s, cls in SECTIONS.items() if name in {f.name for f in dataclasses.fields(cls)}),
        None,
    )


def _suggest(key: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(candidates)}"


def _unknown_key(where: str, section: str, key: str) -> MoetuneError:
    known = [f.name for f in dataclasses.fields(SECTIONS[section])]
    path = f"{section}.{key}"
    home = _home_of(key)
    if home:
        hint = f"; did you mean '{home}'?"
    else:
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
        hint = f"; did you mean '{section}.{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
    return MoetuneError(f"{where}: unknown key '{path}'{hint}")


# ----------------------------------------------------------------------------- building


class RecipeProblems(MoetuneError):
    """Several mistakes in one recipe, reported together: a count, then one line each.

    (A plain MoetuneError folds its message onto one line; each line here names the file, the key and
    the fix on its own, so the lines are kept.)"""

    def __init__(self, where: str, lines: Sequence[str]) -> None:
        self.lines = [" ".join(line.split()) for line in lines]
        body = "\n".join(f"  {line}" for line in self.lines)
        Exception.__init__(self, f"{where}: {len(self.lines)} problems; fix each:\n{body}")


class _Problems:
    """The mistakes found in one recipe, collected so that all of them are reported at once."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.lines: list[str] = []

    def add(self, message: str) -> None:
        if message not in self.lines:
            self.lines.append(message)

    def raise_if_any(self) -> None:
        """One problem: its line. Several: a count, then one line each (each names the file and key)."""
        if len(self.lines) == 1:
            raise MoetuneError(self.lines[0])
        if self.lines:
            raise RecipeProblems(self.where, self.lines)


def _is_set(value: Any) -> bool:
    return value is not None and value is not False


def _merge_overrides(raw: dict, overrides: Sequence[str], where: str, warnings: list[str]) -> dict:
    """Apply `section.key=value` overrides (value parsed as YAML) onto the raw mapping.

    An override wins over the recipe: when it sets one key of an EXCLUSIVE pair and the recipe (not
    another override) sets the other, the recipe's value is dropped and a note says so."""
    parsed: dict[str, tuple[str, str, Any]] = {}
    for item in overrides:
        label = f"--set {item}"
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or "." not in key:
            raise MoetuneError(f"{label}: expected SECTION.KEY=VALUE, e.g. --set train.lr=1e-4")
        section, name = key.split(".", 1)
        if section not in SECTIONS:
            raise MoetuneError(f"{label}: unknown section '{section}'{_suggest(section, list(SECTIONS))}")
        if "." in name:
            raise MoetuneError(f"{label}: '{key}' is nested too deep; set the whole value, e.g. {section}."
                               f"{name.split('.')[0]}={{...}}")  # fmt: skip
        parsed[key] = (section, name, parse_yaml(text, label) if text.strip() else None)
    for key, (_, _, value) in parsed.items():
        for pair in EXCLUSIVE:
            if key not in pair or not _is_set(value):
                continue
            other = pair[1 - pair.index(key)]
            other_section, other_name = other.split(".")
            body = raw.get(other_section)
            if other in parsed or not isinstance(body, dict) or not _is_set(body.get(other_name)):
                continue
            warnings.append(
                f"--set {key}={_show(value)} replaces the recipe's {other}: {_show(body[other_name])} "
                "(the two cannot both be set)"
            )
            del body[other_name]
    for section, name, value in parsed.values():
        body = raw.setdefault(section, {})
        if body is None:
            body = raw[section] = {}
        if not isinstance(body, dict):
            raise MoetuneError(
                f"{where}: section '{section}' must be a mapping of keys, not {type(body).__name__}"
            )
        body[name] = value
    return raw


def _show(value: Any) -> str:
    """A value as YAML writes it inline (`[attention, experts]`, `2`, `null`)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _build_section(section: str, body: Any, where: str, overridden: set[str], problems: _Problems) -> Any:
    """The section's dataclass from its raw mapping; every mistake goes to `problems` (the section is
    then built from what is valid, so later checks still run; None if it cannot be built)."""
    cls = SECTIONS[section]
    if body is None:
        body = {}
    if not isinstance(body, dict):
        problems.add(f"{where}: section '{section}' must be a mapping of keys, not {type(body).__name__}")
        body = {}
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in body.items():
        path = f"{section}.{key}"
        place = f"--set {path}" if path in overridden else f"{where}: {path}"
        if key not in names:
            problems.add(
                str(_unknown_key(f"--set {path}" if path in overridden else where, section, str(key)))
            )
            continue
        if path in ONE_OR_LIST and isinstance(value, str):
            value = [value]
        try:
            values[key] = _coerce(value, hints[key])
        except _Mismatch:
            problems.add(f"{place}: expected {_type_name(hints[key])}, got {value!r}")
    missing = False
    for f in dataclasses.fields(cls):
        path = f"{section}.{f.name}"
        if (
            f.name not in values
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ):
            what = f.metadata["help"].removesuffix(" Required.")
            if f.name not in body:
                problems.add(f"{where}: missing required key '{path}' ({what})")
            missing = True
    return None if missing else cls(**values)


def _check_values(recipe: Recipe, where: str, problems: _Problems) -> None:
    def value(path: str) -> Any:
        section, key = path.split(".")
        return getattr(getattr(recipe, section), key)

    for path in REQUIRED + NOT_EMPTY:
        v = value(path)
        if v is None or v == "" or v == []:
            problems.add(f"{where}: '{path}' is required and empty; give a value")
    for path, low in _AT_LEAST.items():
        v = value(path)
        if v is not None and v < low:
            problems.add(f"{where}: {path} must be >= {low}, got {v}")
    for path in _POSITIVE:
        v = value(path)
        if v is not None and not v > 0:
            problems.add(f"{where}: {path} must be > 0, got {v}")
    for path, interval in _UNIT_INTERVAL.items():
        v = value(path)
        ok = v is None or (0 <= v < 1 if interval == "[0, 1)" else 0 < v < 1)
        if not ok:
            problems.add(f"{where}: {path} must be in {interval}, got {v}")
    a = recipe.adapter
    if any(not t.strip() for t in a.targets):
        problems.add(f"{where}: adapter.targets has an empty name; list group or module names")
    if isinstance(a.layers, str):
        bounds = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", a.layers)
        if not bounds or int(bounds[1]) > int(bounds[2]):
            problems.add(
                f"{where}: adapter.layers '{a.layers}' is not a range START-END (e.g. 0-11) or a list"
            )
    elif a.layers is not None and any(i < 0 for i in a.layers):
        problems.add(f"{where}: adapter.layers must be layer indices >= 0, got {a.layers}")
    if isinstance(a.experts, dict) and any(i < 0 for ids in a.experts.values() for i in ids):
        problems.add(f"{where}: adapter.experts has a negative expert id; ids start at 0")
    if isinstance(a.experts, dict) and any(k < 0 for k in a.experts):
        problems.add(f"{where}: adapter.experts has a negative layer index; layers start at 0")
    if isinstance(a.experts, str) and not a.experts.strip():
        problems.add(f"{where}: adapter.experts is an empty path; give selection.json or null")
    for name in recipe.data.train if isinstance(recipe.data.train, list) else [recipe.data.train]:
        if not name.strip():
            problems.add(f"{where}: data.train has an empty source; give a file, folder, glob or hub id")
    repo = recipe.output.push_to_hub
    if repo is not None and not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo):
        problems.add(f"{where}: output.push_to_hub '{repo}' is not a hub repo id; use OWNER/NAME")


def _check_conflicts(recipe: Recipe, where: str, problems: _Problems) -> None:
    """Cross-field rules: settings that contradict each other are refused, never silently resolved
    (an override that replaces a recipe key is resolved earlier, and noted: `_merge_overrides`)."""
    d, t, o, m = recipe.data, recipe.train, recipe.output, recipe.model
    for a, b in EXCLUSIVE:
        if _is_set(_get(recipe, a)) and _is_set(_get(recipe, b)):
            problems.add(f"{where}: {a} and {b} both set; keep one")
    if d.eval is None and d.eval_fraction is None:
        for key, value in (("train.eval_every", t.eval_every), ("train.eval_batches", t.eval_batches),
                           ("data.max_eval_examples", d.max_eval_examples)):  # fmt: skip
            if value is not None:
                problems.add(
                    f"{where}: {key} is set but there is no eval data; set data.eval or data.eval_fraction"
                )
    if o.private and o.push_to_hub is None:
        problems.add(
            f"{where}: output.private is set but output.push_to_hub is null; name the repo or drop private"
        )
    if m.modalities is not None and not m.name.startswith("preset:"):
        problems.add(
            f"{where}: model.modalities applies to preset:NAME models only; {m.name} has its encoders "
            "already (or none): remove model.modalities"
        )
    if d.format == "multimodal":
        _check_multimodal(d, where, problems)
    elif d.multimodal is not None:
        problems.add(
            f"{where}: data.multimodal is set but data.format is not multimodal; remove it or set data.format: "
            "multimodal"
        )
    if (t.mixed_precision, m.dtype) in (("fp16", "bfloat16"), ("bf16", "float16")):
        problems.add(f"{where}: train.mixed_precision {t.mixed_precision} contradicts model.dtype {m.dtype}; "
                     "make them agree")  # fmt: skip
    if d.pad_to_multiple_of is not None and d.pad_to_multiple_of > d.max_length:
        problems.add(f"{where}: data.pad_to_multiple_of ({d.pad_to_multiple_of}) exceeds data.max_length "
                     f"({d.max_length}); lower it")  # fmt: skip


def _get(recipe: Recipe, path: str) -> Any:
    section, key = path.split(".")
    return getattr(getattr(recipe, section), key)


def _check_multimodal(d: DataSection, where: str, problems: _Problems) -> None:
    """Text-pipeline keys that format multimodal does not use are refused, not ignored; the
    `data.multimodal` options are checked by the multimodal module itself."""
    for key, is_set in (("data.packing", d.packing), ("data.group_by_length", d.group_by_length)):
        if is_set:
            problems.add(f"{where}: {key} is not supported with data.format: multimodal; remove it")
    from finetune.data.multimodal import MultimodalOptions

    try:
        MultimodalOptions.from_section(d)
    except MoetuneError as err:
        problems.add(f"{where}: {err}")


def _defaults_note(raw: dict, recipe: Recipe, where: str) -> str | None:
    """One line naming the headline defaults the recipe relies on (keys it and --set leave out)."""
    used = [
        f"{path}={_show(_get(recipe, path))}"
        for path in HEADLINE_DEFAULTS
        if path.split(".")[1] not in (raw.get(path.split(".")[0]) or {}) and _get(recipe, path) is not None
    ]
    return f"{where}: defaults used: {', '.join(used)}" if used else None


def recipe_from_dict(
    raw: Any, where: str = "recipe", *, name: str = "recipe", overrides: Sequence[str] = ()
) -> Recipe:
    """Validate a raw mapping (as read from YAML) and build a `Recipe`; `where` names it in errors.

    Every problem found is reported in one MoetuneError (one line each)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise MoetuneError(
            f"{where}: a recipe is a mapping with sections {', '.join(SECTIONS)}; got {type(raw).__name__}"
        )
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    warnings: list[str] = []
    raw = _merge_overrides(raw, overrides, where, warnings)
    overridden = {item.partition("=")[0].strip() for item in overrides}
    problems = _Problems(where)
    for section in raw:
        if section not in SECTIONS:
            hint = _suggest(str(section), list(SECTIONS))
            home = _home_of(str(section))
            if home:
                hint = f"; keys live inside a section, e.g. '{home}'"
            problems.add(f"{where}: unknown section '{section}'{hint}")
    sections = {s: _build_section(s, raw.get(s), where, overridden, problems) for s in SECTIONS}
    if any(section is None for section in sections.values()):
        problems.raise_if_any()  # a required key is missing: nothing further can be checked
    recipe = Recipe(**sections)
    _check_values(recipe, where, problems)
    _check_conflicts(recipe, where, problems)
    problems.raise_if_any()
    # Documented defaults, filled in so the saved recipe shows what ran.
    if recipe.train.max_steps is None and recipe.train.epochs is None:
        recipe.train.epochs = 1
    if recipe.output.dir is None:
        recipe.output.dir = str(Path("runs") / name)
    defaults = _defaults_note(raw, recipe, where)
    recipe.notes = [defaults] if defaults else []
    recipe.warnings = warnings
    return recipe


def _recipe_files() -> dict[str, Path]:
    """Bundled recipes by name: their path under recipes/ without `.yaml` (`quickstart`, `gpu/mixtral`)."""
    found: dict[str, Path] = {}
    for path in sorted(RECIPES_DIR.rglob("*.y*ml")):
        rel = path.relative_to(RECIPES_DIR)
        if rel.parts[0] in NOT_RECIPES or path.suffix not in (".yaml", ".yml"):
            continue
        found[rel.with_suffix("").as_posix()] = path
    return found


def find_recipe(path_or_name: str) -> Path:
    """A recipe file: an existing path, else a bundled recipe by name (also its bare file stem)."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    if path.is_dir():
        raise MoetuneError(f"{path_or_name}: is a folder; give a recipe .yaml file or a bundled recipe name")
    bundled = _recipe_files()
    key = path_or_name.removesuffix(".yaml").removesuffix(".yml")
    key = key.removeprefix("recipes/")
    if key in bundled:
        return bundled[key]
    by_stem = [p for n, p in bundled.items() if n.rsplit("/", 1)[-1] == key]
    if len(by_stem) == 1:
        return by_stem[0]
    close = difflib.get_close_matches(key, list(bundled), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else "; `moetune recipes` lists the bundled ones"
    raise MoetuneError(f"{path_or_name}: no such recipe file or bundled recipe{hint}")


def _name_of(path: Path) -> str:
    try:
        return path.resolve().relative_to(RECIPES_DIR).with_suffix("").as_posix()
    except ValueError:
        return path.stem


def load_recipe(path_or_name: str, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override, validate. `path_or_name` is a YAML path or a bundled recipe name."""
    path = find_recipe(str(path_or_name))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise MoetuneError(
            f"{_display(path)}: cannot read the recipe ({err.__class__.__name__}: {err})"
        ) from err
    where = _display(path)
    recipe = recipe_from_dict(parse_yaml(text, where), where, name=_name_of(path), overrides=overrides)
    if _is_bundled(path):
        resolve_bundled_paths(recipe, overridden={o.partition("=")[0].strip() for o in overrides})
    return recipe


def _is_bundled(path: Path) -> bool:
    return path.resolve().is_relative_to(RECIPES_DIR.resolve())


def resolve_bundled_paths(recipe: Recipe, overridden: set[str] = frozenset()) -> None:
    """Point a bundled recipe's own sample data at the installation when the working folder lacks it.

    The bundled recipes name their data relative to the repository (`recipes/data/chat-sample.jsonl`,
    `docs`), which is the working folder when run from a clone; from any other folder the same path
    is looked up next to the recipes instead, and a note says so. A path the user gave (`--set`) or
    one that exists where `moetune` runs is left alone."""
    root = RECIPES_DIR.parent
    for key in ("data.train", "data.eval"):
        if key in overridden:
            continue
        value = _get(recipe, key)
        sources = value if isinstance(value, list) else [value]
        resolved = []
        for source in sources:
            if (
                isinstance(source, str)
                and not Path(source).is_absolute()
                and not Path(source).exists()
                and (root / source).exists()
            ):
                recipe.notes.append(f"{key}: {source} is read from the moetune installation: {root / source}")
                source = str(root / source)
            resolved.append(source)
        if value is not None:
            setattr(recipe.data, key.split(".")[1], resolved if isinstance(value, list) else resolved[0])


def _display(path: Path) -> str:
    """The path as errors show it: relative to the working directory when it is inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def recipe_to_dict(recipe: Recipe) -> dict[str, dict[str, Any]]:
    """The recipe as plain YAML-ready data, every key present (defaults included)."""
    return {name: dataclasses.asdict(getattr(recipe, name)) for name in SECTIONS}


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> Path:
    """Write the resolved recipe as YAML (atomically: temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, allow_unicode=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("# Resolved moetune recipe: every key, defaults filled in.\n" + body, encoding="utf-8")
    os.replace(tmp, path)
    return path


def header_comment(text: str) -> list[str]:
    """The comment block a recipe opens with, without the `#` marks."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return lines


def list_recipes() -> list[tuple[str, str]]:
    """(name, one-line description) of every bundled recipe; the description is the header's first line."""
    rows = []
    for name, path in _recipe_files().items():
        header = header_comment(path.read_text(encoding="utf-8"))
        rows.append((name, header[0] if header else ""))
    return rows


def describe_keys() -> list[tuple[str, str, str, str]]:
    """(key path, type, default, help) for every recipe key: the reference table of the docs."""
    rows = []
    for section, cls in SECTIONS.items():
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = json.dumps(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = json.dumps(f.default_factory())
            else:
                default = "required"
            rows.append((f"{section}.{f.name}", _type_name(hints[f.name]), default, f.metadata["help"]))
    return rows


def keys_markdown() -> str:
    """The table of every recipe key, as docs/recipes-and-data.md shows it (`python -m finetune.recipe`)."""
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, type_name, default, help_text in describe_keys():
        kind, cell = (text.replace("|", "\\|") for text in (type_name, help_text))
        lines.append(f"| `{key}` | {kind} | `{default}` | {cell} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(keys_markdown(), end="")
