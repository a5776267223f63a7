"""Recipe files: YAML reading, `--set` overrides, the bundled recipes, writing the resolved recipe.

`load_recipe` reads a file or a bundled recipe by name, applies `--set section.key=value` overrides
(values parsed as YAML) and validates (finetune/recipe/validation.py). An override wins over the
recipe, as on the command line of the peers (torchtune, axolotl, LLaMA-Factory): `--set
train.max_steps=5` on a recipe with `train.epochs: 2` replaces the epochs (the two cannot both be
set) and a warning says so; only keys the recipe sets conflict this way, two overrides that
contradict each other are still refused.

Relative paths in a recipe (data files, an experts selection.json, output.dir) are relative to the
directory `moetune` runs in, as for any command-line argument; the data paths of the bundled recipes
(`recipes/data/...`) are found next to the recipes when they are not there (`resolve_bundled_paths`).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from finetune.errors import MoetuneError
from finetune.recipe.schema import EXCLUSIVE, SECTIONS, Recipe, get_key, recipe_to_dict
from finetune.recipe.validation import is_set, show_value, suggestion, validate

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
# Accelerate launch configs live under recipes/ too, but they are not training recipes.
NOT_RECIPES = ("accelerate",)


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


# ----------------------------------------------------------------------------- overrides


def merge_overrides(raw: dict, overrides: Sequence[str], where: str, warnings: list[str]) -> dict:
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
            raise MoetuneError(f"{label}: unknown section '{section}'{suggestion(section, list(SECTIONS))}")
        if "." in name:
            raise MoetuneError(
                f"{label}: '{key}' is nested too deep; set the whole value, e.g. {section}."
                f"{name.split('.')[0]}={{...}}"
            )
        parsed[key] = (section, name, parse_yaml(text, label) if text.strip() else None)
    for key, (_, _, value) in parsed.items():
        for pair in EXCLUSIVE:
            if key not in pair or not is_set(value):
                continue
            other = pair[1 - pair.index(key)]
            other_section, other_name = other.split(".")
            body = raw.get(other_section)
            if other in parsed or not isinstance(body, dict) or not is_set(body.get(other_name)):
                continue
            warnings.append(
                f"--set {key}={show_value(value)} replaces the recipe's {other}: {show_value(body[other_name])} "
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


def recipe_from_dict(
    raw: Any, where: str = "recipe", *, name: str = "recipe", overrides: Sequence[str] = ()
) -> Recipe:
    """Apply `overrides` to a raw mapping (as read from YAML), validate it and build a `Recipe`;
    `where` names it in errors. Every problem found is reported in one MoetuneError (one line each)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise MoetuneError(
            f"{where}: a recipe is a mapping with sections {', '.join(SECTIONS)}; got {type(raw).__name__}"
        )
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    warnings: list[str] = []
    raw = merge_overrides(raw, overrides, where, warnings)
    overridden = {item.partition("=")[0].strip() for item in overrides}
    return validate(raw, where, name=name, overridden=overridden, warnings=warnings)


# ----------------------------------------------------------------------------- files


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
        value = get_key(recipe, key)
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


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> Path:
    """Write the resolved recipe as YAML, atomically (adapters/output_folder.py: fsync, rename)."""
    from adapters.output_folder import write_file_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, allow_unicode=True)
    return write_file_atomic(path, "# Resolved moetune recipe: every key, defaults filled in.\n" + body)


def header_comment(text: str) -> list[str]:
    """The comment block a recipe opens with, without the `#` marks."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return lines


class RecipeEntry(NamedTuple):
    """A bundled recipe: its name (`gpu/mixtral`) and the first line of its header."""

    name: str
    description: str


class RecipeList(list[RecipeEntry]):
    """The bundled recipes; `str()` is the table `moetune recipes` prints."""

    def __str__(self) -> str:
        return "\n".join(f"{entry.name:<28} {entry.description}" for entry in self)


def list_recipes() -> RecipeList:
    """(name, one-line description) of every bundled recipe; the description is the header's first line."""
    rows = RecipeList()
    for name, path in _recipe_files().items():
        header = header_comment(path.read_text(encoding="utf-8"))
        rows.append(RecipeEntry(name, header[0] if header else ""))
    return rows
