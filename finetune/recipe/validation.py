"""Recipe validation: types, ranges, cross-field rules, and errors that say where and how to fix.

`validate` builds a `Recipe` from a raw mapping (as read from YAML, overrides applied) and checks it
in one place: every value against its field's type (`_coerce`; ints are accepted for floats,
integral floats for ints), ranges (`_check_values`), cross-field conflicts (`_check_conflicts`),
with a did-you-mean for unknown keys. All the problems of a recipe are reported together, one line
each (`RecipeProblems`). Nothing is rewritten silently: the defaults filled in are documented, and
the recipe's `notes` say which ones a run relies on.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from finetune.errors import MoetuneError
from finetune.recipe.schema import (
    ESFT_KEYS,
    EXCLUSIVE,
    HEADLINE_DEFAULTS,
    NOT_EMPTY,
    ONE_OR_LIST,
    REQUIRED,
    SECTIONS,
    UNION_TYPES,
    DataSection,
    Recipe,
    esft_profile,
    get_key,
    type_name,
)

_AT_LEAST = {
    "adapter.r": 1,
    "data.max_length": 2,
    "data.pad_to_multiple_of": 1,
    "data.max_examples": 1,
    "data.max_eval_examples": 1,
    "train.max_steps": 1,
    "train.epochs": 1,
    "train.batch_size": 1,
    "train.grad_accum": 1,
    "train.weight_decay": 0,
    "train.warmup_steps": 0,
    "train.eval_every": 1,
    "train.save_every": 1,
    "train.log_every": 1,
    "train.eval_batches": 1,
    "output.keep_checkpoints": 1,
    "eval.batch_size": 1,
    "eval.max_examples": 1,
    "eval.max_new_tokens": 1,
}
_POSITIVE = ("adapter.alpha", "train.lr", "train.max_grad_norm")
_UNIT_INTERVAL = {
    "adapter.dropout": "[0, 1)",
    "train.warmup_fraction": "[0, 1)",
    "data.eval_fraction": "(0, 1)",
}


# ----------------------------------------------------------------------------- types


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
    if origin in UNION_TYPES:
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


def _home_of(name: str) -> str | None:
    """The full key path of a key name in whichever section has it (`max_length` -> `data.max_length`)."""
    return next(
        (f"{s}.{name}" for s, cls in SECTIONS.items() if name in {f.name for f in dataclasses.fields(cls)}),
        None,
    )


def suggestion(key: str, candidates: Sequence[str]) -> str:
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


# ----------------------------------------------------------------------------- problems


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


def is_set(value: Any) -> bool:
    return value is not None and value is not False


def show_value(value: Any) -> str:
    """A value as YAML writes it inline (`[attention, experts]`, `2`, `null`)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


# ----------------------------------------------------------------------------- building


def _build_section(section: str, body: Any, where: str, overridden: set[str], problems: _Problems) -> Any:
    """The section's dataclass from its raw mapping; every mistake goes to `problems` (the section is
    then built from what is valid, so later checks still run; None if it cannot be built)."""
    cls = SECTIONS[section]
    if body is None:
        body = {}
    if not isinstance(body, dict):
        problems.add(f"{where}: section '{section}' must be a mapping of keys, not {type(body).__name__}")
        body = {}
    hints = typing.get_type_hints(cls)
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
            problems.add(f"{place}: expected {type_name(hints[key])}, got {value!r}")
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
    if esft_profile(a.experts) is not None:
        _check_esft(a, where, problems)
    elif isinstance(a.experts, dict) and any(i < 0 for ids in a.experts.values() for i in ids):
        problems.add(f"{where}: adapter.experts has a negative expert id; ids start at 0")
    elif isinstance(a.experts, dict) and any(k < 0 for k in a.experts):
        problems.add(f"{where}: adapter.experts has a negative layer index; layers start at 0")
    if isinstance(a.experts, str) and not a.experts.strip():
        problems.add(f"{where}: adapter.experts is an empty path; give selection.json or null")
    for name in recipe.data.train if isinstance(recipe.data.train, list) else [recipe.data.train]:
        if not name.strip():
            problems.add(f"{where}: data.train has an empty source; give a file, folder, glob or hub id")
    repo = recipe.output.push_to_hub
    if repo is not None and not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo):
        problems.add(f"{where}: output.push_to_hub '{repo}' is not a hub repo id; use OWNER/NAME")


def _check_esft(a: Any, where: str, problems: _Problems) -> None:
    """adapter.experts {threshold, data, metric, max_examples}: ESFT's selection made in the run."""
    spec = a.experts
    for key in spec:
        if key not in ESFT_KEYS:
            problems.add(
                f"{where}: adapter.experts.{key} is not an ESFT key ({', '.join(ESFT_KEYS)}); a mapping of layer "
                "-> expert ids has integer keys"
            )
    threshold = spec.get("threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 < threshold <= 1:
        problems.add(f"{where}: adapter.experts.threshold must be a number in (0, 1], got {threshold!r}")
    data = spec.get("data")
    if data is not None and not (
        isinstance(data, str) or (isinstance(data, list) and all(isinstance(d, str) for d in data))
    ):
        problems.add(f"{where}: adapter.experts.data must be a source like data.train's, got {data!r}")
    if spec.get("metric", "token_ratio") not in ("token_ratio", "gate_score"):
        problems.add(
            f"{where}: adapter.experts.metric must be token_ratio or gate_score, got {spec['metric']!r}"
        )
    count = spec.get("max_examples", 256)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        problems.add(f"{where}: adapter.experts.max_examples must be an integer >= 1, got {count!r}")
    if "experts" not in a.targets:
        problems.add(
            f"{where}: adapter.experts selects experts but 'experts' is not in adapter.targets; add it"
        )


def _check_conflicts(recipe: Recipe, where: str, problems: _Problems) -> None:
    """Cross-field rules: settings that contradict each other are refused, never silently resolved
    (an override that replaces a recipe key is resolved earlier, and noted: `_merge_overrides`)."""
    d, t, o, m = recipe.data, recipe.train, recipe.output, recipe.model
    for a, b in EXCLUSIVE:
        if is_set(get_key(recipe, a)) and is_set(get_key(recipe, b)):
            problems.add(f"{where}: {a} and {b} both set; keep one")
    if d.eval is None and d.eval_fraction is None and d.retain is None:  # data.retain is measured too
        for key, value in (
            ("train.eval_every", t.eval_every),
            ("train.eval_batches", t.eval_batches),
            ("data.max_eval_examples", d.max_eval_examples),
        ):
            if value is not None:
                problems.add(
                    f"{where}: {key} is set but there is no eval data; set data.eval or data.eval_fraction"
                )
    _check_eval(recipe, where, problems)
    if o.private and o.push_to_hub is None:
        problems.add(
            f"{where}: output.private is set but output.push_to_hub is null; name the repo or drop private"
        )
    if m.modalities is not None and not m.name.startswith("preset:"):
        problems.add(
            f"{where}: model.modalities applies to preset:NAME models only; {m.name} has its encoders "
            "already (or none): remove model.modalities"
        )
    from finetune.preference import preference_problems

    for line in preference_problems(t.method, t.preference, d.format):
        problems.add(f"{where}: {line}")
    if d.format == "preference" and d.packing:
        problems.add(f"{where}: data.packing is not supported with data.format: preference; remove it")
    if d.format == "multimodal":
        _check_multimodal(d, where, problems)
    elif d.multimodal is not None:
        problems.add(
            f"{where}: data.multimodal is set but data.format is not multimodal; remove it or set data.format: "
            "multimodal"
        )
    if (t.mixed_precision, m.dtype) in (("fp16", "bfloat16"), ("bf16", "float16")):
        problems.add(
            f"{where}: train.mixed_precision {t.mixed_precision} contradicts model.dtype {m.dtype}; "
            "make them agree"
        )
    if d.pad_to_multiple_of is not None and d.pad_to_multiple_of > d.max_length:
        problems.add(
            f"{where}: data.pad_to_multiple_of ({d.pad_to_multiple_of}) exceeds data.max_length "
            f"({d.max_length}); lower it"
        )


def _check_eval(recipe: Recipe, where: str, problems: _Problems) -> None:
    """Task metrics need held-out data, and generation needs whole examples (not packed rows)."""
    d, e = recipe.data, recipe.eval
    tasks = [name for name in e.metrics if name != "loss"]
    if tasks and d.eval is None and d.eval_fraction is None:
        problems.add(
            f"{where}: eval.metrics {show_value(tasks)} need eval data; set data.eval or data.eval_fraction"
        )
    generation = [name for name in tasks if name in ("exact_match", "word_accuracy")]
    if generation and d.packing:
        problems.add(
            f"{where}: eval.metrics {show_value(generation)} generate from whole examples; set data.packing: false"
        )
    if len(set(e.metrics)) != len(e.metrics):
        problems.add(f"{where}: eval.metrics {show_value(e.metrics)} names a metric twice; list each once")


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
        f"{path}={show_value(get_key(recipe, path))}"
        for path in HEADLINE_DEFAULTS
        if path.split(".")[1] not in (raw.get(path.split(".")[0]) or {}) and get_key(recipe, path) is not None
    ]
    return f"{where}: defaults used: {', '.join(used)}" if used else None


def validate(raw: dict, where: str, *, name: str, overridden: set[str], warnings: list[str]) -> Recipe:
    """The `Recipe` of a raw mapping (overrides applied); `where` names it in errors, `overridden` the
    keys that came from `--set`, `warnings` what the overrides replaced. Every problem found is
    reported in one MoetuneError (one line each)."""
    problems = _Problems(where)
    for section in raw:
        if section not in SECTIONS:
            hint = suggestion(str(section), list(SECTIONS))
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
