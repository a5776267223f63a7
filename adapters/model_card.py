"""Model cards (README.md) for adapter and merged-model folders, and their validation before a push.

The card is YAML front matter the Hub indexes (`base_model`, `library_name: peft` for adapters,
`tags` with moe and lora, `datasets`, `license`, metric names and a `model-index` with the values of
metrics.json) and a body: how to load the folder with PEFT / transformers, the recipe it came from,
the results, and the expert-load picture when there is one.

Local paths never go into the metadata (the Hub wants ids there, and a path can name a user's home):
a base or a dataset given as a local path is named by its folder or file name in the body only.
Secrets never go anywhere: recipe keys that look like credentials are replaced by "<redacted>", and
the Hugging Face token, if one is set, is scrubbed from the rendered text.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from adapters.errors import MoetuneError
from adapters.output_folder import write_file_atomic

KINDS = ("adapter", "merged")
# The placeholder the loading snippet uses for this folder; `moetune push` writes the repo id instead.
THIS_FOLDER = "path/to/this/folder"
RECIPE_FILES = ("recipe.yaml", "recipe.yml", "recipe.json")
REQUIRED_TAGS = ("moe", "lora")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_DATA_SUFFIXES = (".json", ".jsonl", ".txt", ".csv", ".tsv", ".parquet", ".arrow", ".yaml", ".yml")
_SECRET_KEY = re.compile(r"token|secret|password|passwd|api[_-]?key|credential", re.IGNORECASE)
# Metrics that are results (go into the model-index); the rest (steps, tokens/s, ...) stay in the body.
_RESULT_METRIC = re.compile(r"loss|perplexity|accuracy|f1|score|bleu|rouge|exact_match|recall", re.IGNORECASE)
REDACTED = "<redacted>"


def is_hub_id(name: object) -> bool:
    """True for "org/name" or "name" that is not a local path or a data file."""
    if not isinstance(name, str) or not _HUB_ID.match(name) or ".." in name or "--" in name:
        return False
    return not name.lower().endswith(_DATA_SUFFIXES) and not Path(name).exists()


def hub_token() -> str | None:
    """The Hugging Face token from HF_TOKEN or the huggingface_hub login; None when there is none."""
    from huggingface_hub import get_token

    return get_token() or None


def scrub(text: str, token: str | None = None) -> str:
    """`text` with the Hugging Face token (if any is configured) replaced by "<redacted>"."""
    token = token if token is not None else hub_token()
    return text.replace(token, REDACTED) if token else text


def redact(value: Any) -> Any:
    """A copy of a recipe with the values of credential-like keys (token, secret, password, ...) replaced."""
    if isinstance(value, Mapping):
        return {
            k: REDACTED if _SECRET_KEY.search(str(k)) and v not in (None, "") else redact(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


# ----------------------------------------------------------------------------- inputs


def _load_metrics(folder: Path, metrics) -> dict[str, float]:
    """Numeric leaves of metrics (a dict, a metrics.json path, or None = folder/metrics.json), flattened."""
    if metrics is None:
        metrics = folder / "metrics.json"
        if not metrics.is_file():
            return {}
    if isinstance(metrics, (str, os.PathLike)):
        try:
            metrics = json.loads(Path(metrics).read_text())
        except (OSError, ValueError) as err:
            raise MoetuneError(f"cannot read metrics from {metrics}: {err}") from err
    if not isinstance(metrics, Mapping):
        raise MoetuneError(f"metrics must be a JSON object of name -> number; got {type(metrics).__name__}")
    flat: dict[str, float] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[prefix] = value

    walk("", metrics)
    return flat


def _load_recipe(folder: Path, recipe) -> Mapping | None:
    if recipe is None:
        found = [folder / name for name in RECIPE_FILES if (folder / name).is_file()]
        if not found:
            return None
        recipe = found[0]
    if isinstance(recipe, (str, os.PathLike)):
        try:
            recipe = yaml.safe_load(Path(recipe).read_text())
        except (OSError, yaml.YAMLError) as err:
            raise MoetuneError(f"cannot read the recipe {recipe}: {err}") from err
    if not isinstance(recipe, Mapping):
        raise MoetuneError(f"the recipe must be a mapping (YAML / JSON object); got {type(recipe).__name__}")
    return redact(recipe)


def _collect_images(folder: Path, images: Iterable) -> list[str]:
    """Relative paths (inside `folder`) of the pictures to show: those given plus any expert-load PNG."""
    found: list[Path] = []
    for image in images:
        path = Path(image)
        if not path.is_file():
            raise MoetuneError(f"image {path} does not exist")
        found.append(path)
    for pattern in ("*expert*.png", "*/*expert*.png"):
        found.extend(sorted(folder.glob(pattern)))
    rel: list[str] = []
    for path in found:
        try:
            name = path.resolve().relative_to(folder.resolve()).as_posix()
        except ValueError:  # outside the folder: copy it in so the card's link works on the Hub
            (folder / "images").mkdir(exist_ok=True)
            shutil.copy2(path, folder / "images" / path.name)
            name = f"images/{path.name}"
        if name not in rel:
            rel.append(name)
    return rel


def _base_license(base_model: str | None) -> str | None:
    if base_model and Path(base_model).is_dir():
        return read_card_metadata(Path(base_model) / "README.md").get("license")
    return None


def _uses_builtin_architecture(folder: Path, base_model: str | None) -> bool:
    """True when the model is moetune's own architecture (loading it needs `import finetune`)."""
    configs = [folder / "config.json", folder / "adapter_config.json"]
    if base_model and Path(base_model).is_dir():
        configs.append(Path(base_model) / "config.json")
    for path in configs:
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(config, dict):
            continue
        library = str((config.get("auto_mapping") or {}).get("parent_library") or "")
        if config.get("model_type") == "moetune" or library.startswith("finetune"):
            return True
    return False


# ----------------------------------------------------------------------------- rendering


def _metadata(kind, base_model, datasets, metrics, license, title) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    hub_datasets = [d for d in datasets if is_hub_id(d)]
    metrics = {
        name: value for name, value in metrics.items() if "/" not in name and _RESULT_METRIC.search(name)
    }
    tags = ["moe", "lora", "mixture-of-experts", "moetune"] + (
        ["peft"] if kind == "adapter" else ["merged-lora"]
    )
    results = [
        EvalResult(
            task_type="text-generation",
            dataset_type=hub_datasets[0] if hub_datasets else "custom",
            dataset_name=hub_datasets[0] if hub_datasets else "custom",
            metric_type=name,
            metric_name=name,
            metric_value=value,
        )
        for name, value in metrics.items()
    ]
    data = ModelCardData(
        base_model=base_model if is_hub_id(base_model) else None,
        library_name="peft" if kind == "adapter" else "transformers",
        license=license,
        datasets=hub_datasets or None,
        tags=tags,
        pipeline_tag="text-generation",
        metrics=list(metrics) or None,
        model_name=title if results else None,
        eval_results=results or None,
    )
    if is_hub_id(base_model):
        data.base_model_relation = "adapter" if kind == "adapter" else "finetune"
    return data.to_yaml().rstrip("\n") + "\n"


def _name(path_or_id: str) -> str:
    return path_or_id if is_hub_id(path_or_id) else f"local: {Path(path_or_id).name}"


def _load_snippet(kind: str, base_model: str | None, builtin: bool) -> str:
    base = base_model if is_hub_id(base_model) else "path/to/the/base/model"
    register = (
        "import finetune  # registers the built-in moetune architecture (pip install moetune)\n"
        if builtin
        else ""
    )
    if kind == "adapter":
        return (
            "```python\n"
            f"{register}from peft import PeftModel\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{base}", dtype="auto")\n'
            f'model = PeftModel.from_pretrained(base, "{THIS_FOLDER}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{base}")\n'
            "model = model.merge_and_unload()  # optional: fold the LoRA into the weights\n"
            "```\n\n"
            "Or with the moetune command line: "
            f'`moetune generate {base} --adapter {THIS_FOLDER} --prompt "..."`; '
            f"`moetune merge {base} --adapter {THIS_FOLDER} --output merged` writes a full model.\n"
        )
    return (
        "```python\n"
        f"{register}from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{THIS_FOLDER}", dtype="auto")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{THIS_FOLDER}")\n'
        "```\n\nNo PEFT is needed: the LoRA is already folded into the weights.\n"
    )


def _metrics_table(metrics: Mapping[str, float]) -> str:
    rows = "".join(f"| {name} | {value:.6g} |\n" for name, value in metrics.items())
    return "| metric | value |\n| --- | --- |\n" + rows


def write_model_card(folder: str | os.PathLike, **kwargs: Any) -> Path:
    """Write folder/README.md (atomically) and return its path; the arguments are `render_model_card`'s."""
    folder = Path(folder)
    text = render_model_card(folder, **kwargs)
    return write_file_atomic(folder / "README.md", text)


def render_model_card(
    folder: str | os.PathLike,
    *,
    base_model: str | None,
    kind: str = "adapter",
    datasets: Iterable[str] = (),
    metrics: Mapping | str | os.PathLike | None = None,
    recipe: Mapping | str | os.PathLike | None = None,
    images: Iterable[str | os.PathLike] = (),
    license: str | None = None,
    details: str | None = None,
    title: str | None = None,
) -> str:
    """The text of folder/README.md (the token, if one is set, scrubbed).

    kind: "adapter" (library_name peft) or "merged" (a full transformers model). metrics: a dict, a
    path to a metrics.json, or None to read folder/metrics.json if present. recipe: a mapping, a YAML /
    JSON path, or None to use folder/recipe.yaml if present. images: pictures to show (expert load);
    PNGs named *expert* inside the folder are found on their own. license: default the base folder's
    card license, else "other". details: extra Markdown (e.g. the merge report), shown last. title:
    the heading and model-index name (default: the folder's name, without a temporary-folder marker).
    """
    folder = Path(folder)
    if kind not in KINDS:
        raise MoetuneError(f"model card kind must be one of {KINDS}; got '{kind}'")
    if not folder.is_dir():
        raise MoetuneError(f"cannot write a model card: {folder} is not a folder")
    datasets = [str(d) for d in datasets]
    metric_values = _load_metrics(folder, metrics)
    recipe_map = _load_recipe(folder, recipe)
    pictures = _collect_images(folder, images)
    license = license or _base_license(base_model) or "other"
    builtin = _uses_builtin_architecture(folder, base_model)
    title = title or re.sub(
        r"^\.(tmp-)?|\.tmp-\d+$", "", folder.name
    )  # callers write into a temporary folder

    if not base_model:
        base = "the Mixture-of-Experts model it was trained on"
    elif is_hub_id(base_model):
        base = f"the Mixture-of-Experts model [{base_model}](https://huggingface.co/{base_model})"
    else:  # a local folder or a preset: named, never by its path; the metadata cannot link it
        base = f"the Mixture-of-Experts model `{Path(base_model).name}` (not on the Hub, so the metadata names no base_model)"
    what = (
        f"A LoRA adapter for {base}, trained with moetune: LoRA in the routed experts (fused expert tensors) "
        "and wherever else the recipe put it (attention, shared experts, ...)."
        if kind == "adapter"
        else f"{base[0].upper()}{base[1:]}, with a moetune LoRA adapter folded into its weights: a full model."
    )
    body = [f"# {title}\n\n{what}\n"]
    if datasets:
        body.append("Training data: " + ", ".join(f"`{_name(d)}`" for d in datasets) + ".\n")
    body.append("## How to load\n\n" + _load_snippet(kind, base_model, builtin))
    if recipe_map:
        text = yaml.safe_dump(dict(recipe_map), sort_keys=False, allow_unicode=True)
        body.append(f"## Recipe\n\nThe recipe this folder came from:\n\n```yaml\n{text}```\n")
    if metric_values:
        body.append("## Results\n\n" + _metrics_table(metric_values))
    if pictures:
        text = "## Plots\n\n"
        if any("expert" in p for p in pictures):
            text += "The expert-load picture shows the share of routed tokens per expert and layer.\n\n"
        text += "".join(f"![{Path(p).stem.replace('_', ' ')}]({p})\n\n" for p in pictures)
        body.append(text.rstrip("\n") + "\n")
    if details:
        body.append(details.rstrip() + "\n")

    text = (
        "---\n"
        + _metadata(kind, base_model, datasets, metric_values, license, title)
        + "---\n\n"
        + "\n".join(body)
    )
    return scrub(text)


# ----------------------------------------------------------------------------- reading and validating


def split_front_matter(text: str) -> tuple[str | None, str]:
    """(YAML front matter or None, body) of a card."""
    match = re.match(r"^---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", text, re.DOTALL)
    if not match:
        return None, text
    return match.group(1), text[match.end() :]


def read_card_metadata(path: str | os.PathLike) -> dict:
    """The YAML metadata of a card; {} when the file or the metadata is missing or unreadable."""
    try:
        front, _ = split_front_matter(Path(path).read_text())
        data = yaml.safe_load(front) if front else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def validate_model_card(folder: str | os.PathLike) -> list[str]:
    """Check folder/README.md before a push; raise MoetuneError on a problem, return warnings."""
    folder = Path(folder)
    path = folder / "README.md"
    if not path.is_file():
        raise MoetuneError(
            f"{folder} has no model card (README.md); `moetune train` and `moetune merge` write one, or "
            "call adapters.model_card.write_model_card"
        )
    return validate_card_text(
        path.read_text(), is_adapter=(folder / "adapter_config.json").is_file(), where=path
    )


def validate_card_text(text: str, *, is_adapter: bool, where: str | os.PathLike) -> list[str]:
    """Check a card's text (`where` names it in errors); raise MoetuneError on a problem, return warnings."""
    from huggingface_hub import ModelCard

    path = where
    front, body = split_front_matter(text)
    if front is None:
        raise MoetuneError(f"{path} has no YAML metadata block (--- ... --- at the top)")
    try:
        data = yaml.safe_load(front)
    except yaml.YAMLError as err:
        raise MoetuneError(f"{path}: the YAML metadata does not parse: {' '.join(str(err).split())}") from err
    if not isinstance(data, dict):
        raise MoetuneError(f"{path}: the YAML metadata must be a mapping")
    try:
        ModelCard(text, ignore_metadata_errors=False)  # parses model-index like the Hub does
    except Exception as err:
        raise MoetuneError(f"{path}: invalid metadata: {' '.join(str(err).split())}") from err

    problems = []
    if is_adapter and data.get("library_name") != "peft":
        problems.append(f"library_name is {data.get('library_name')!r}, an adapter needs 'peft'")
    tags = data.get("tags") or []
    missing = [t for t in REQUIRED_TAGS if t not in tags]
    if missing:
        problems.append(f"tags lack {', '.join(missing)}")
    if not data.get("license"):
        problems.append("no license")
    for key in ("base_model", "datasets"):
        values = data.get(key)
        values = [values] if isinstance(values, str) else values or []
        bad = [v for v in values if not is_hub_id(v)]
        if bad:
            problems.append(f"{key} {bad[0]!r} is not a Hub id (org/name)")
    if problems:
        raise MoetuneError(f"{path}: " + "; ".join(problems))
    warnings = []
    if not data.get("base_model"):
        warnings.append(
            "the card names no base_model, so the Hub will not link the base; pass --base-model ORG/NAME "
            "(the Hub id of the base) to `moetune push`"
        )
    if not body.strip():
        warnings.append("the card has no body text")
    return warnings
