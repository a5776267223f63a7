"""Complete a folder's model card for a push: write one when there is none, fill what the Hub needs.

`moetune train` / `merge` write full cards; a folder saved with PEFT's `save_pretrained` from Python
has PEFT's template card (`base_model: ''` or a local path, no license, no moe tag) or none. Rather
than refusing such a folder, the push completes the card in the uploaded copy (the folder itself is
never changed), says in one line what it filled, and warns, one line each, about what it could not:

- no README.md: a moetune card is written from adapter_config.json, metrics.json and recipe.yaml;
- a README.md without metadata: a metadata block is put on top of its text;
- `base_model`: the `--base-model` Hub id, else the card's or adapter_config.json's when that is a Hub
  id; a local path or '' is left out (warned: pass --base-model), and PEFT's `base_model:adapter:PATH`
  tags go with it;
- `license`: `--license`, else the card's, else the local base folder's card's, else `other` (warned);
- `library_name` (peft for adapters, transformers for models) and the `moe` / `lora` tags when missing;
- `datasets` entries that are not Hub ids are left out (warned).
What the user wrote explicitly and the Hub would reject (metadata that does not parse, a wrong
`library_name`) is still refused. Hugging Face's own `huggingface_hub.ModelCard` parses and writes
the metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from adapters.errors import MoetuneError
from adapters.model_card import (
    REQUIRED_TAGS,
    is_hub_id,
    read_card_metadata,
    render_model_card,
    split_front_matter,
    validate_card_text,
)


@dataclass
class CompletedCard:
    """The card text to upload, what was filled in, and what could not be."""

    text: str
    base_model: str | None  # the Hub id of the base, when known
    filled: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _adapter_config(folder: Path) -> dict | None:
    path = folder / "adapter_config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise MoetuneError(f"{path} is not valid JSON ({err}); re-save the adapter") from None
    return config if isinstance(config, dict) else {}


def _base_choice(given: str | None, card: dict, adapter_config: dict | None) -> tuple[str | None, str | None]:
    """(Hub id of the base or None, the local name it had when it is not a Hub id)."""
    if given is not None:
        if not is_hub_id(given):
            raise MoetuneError(f"--base-model '{given}' is not a Hub id; write org/name as on huggingface.co")
        return given, None
    recorded = (adapter_config or {}).get("base_model_name_or_path") or None
    for candidate in (card.get("base_model"), recorded):
        if isinstance(candidate, str) and is_hub_id(candidate):
            return candidate, None
    local = card.get("base_model") or recorded
    return None, (str(local) if local else None)


def _names_a_local_base(tag: str) -> bool:
    """PEFT's `base_model:adapter:NAME` tag (the Hub sets such tags itself) with a NAME that is no Hub id."""
    if not tag.startswith("base_model:"):
        return False
    relation, _, name = tag.removeprefix("base_model:").partition(":")
    return not is_hub_id(name if relation in ("adapter", "finetune", "merge", "quantized") else relation)


def _local_license(name: str | None) -> str | None:
    if name and Path(name).is_dir():
        return read_card_metadata(Path(name) / "README.md").get("license")
    return None


def complete_card(
    folder: str | Path, *, base_model: str | None = None, license: str | None = None
) -> CompletedCard:
    """The card to upload for `folder` (see the module docstring); validated, never written to the folder."""
    from huggingface_hub import ModelCard

    folder = Path(folder)
    adapter_config = _adapter_config(folder)
    kind = "adapter" if adapter_config is not None else "merged"
    path = folder / "README.md"
    text = path.read_text() if path.is_file() else None
    front, body = split_front_matter(text) if text is not None else (None, "")
    try:
        card = (yaml.safe_load(front) if front else None) or {}
    except yaml.YAMLError as err:
        raise MoetuneError(f"{path}: the YAML metadata does not parse: {' '.join(str(err).split())}") from err
    if not isinstance(card, dict):
        raise MoetuneError(f"{path}: the YAML metadata must be a mapping")
    hub_base, local_base = _base_choice(base_model, card, adapter_config)
    where = local_base if local_base and local_base.startswith("preset:") else Path(local_base or "").name
    done = CompletedCard(text="", base_model=hub_base)
    if local_base and not hub_base:
        done.warnings.append(
            f"the base is local ({where}), so the card names no base_model and the Hub will not link it; "
            "pass --base-model ORG/NAME (the Hub id of that base)"
        )
    chosen_license = license or card.get("license") or _local_license(local_base)

    if text is None:  # no card: write moetune's
        rendered = render_model_card(
            folder, base_model=hub_base or local_base, kind=kind, license=chosen_license or "other"
        )
        done.filled.append("wrote a model card (there was no README.md)")
        if not chosen_license:
            done.warnings.append(
                "no license is known; the card says 'other' (pass --license, e.g. apache-2.0)"
            )
        done.text = rendered
        _validate(done, kind, path, local_base)
        return done

    model_card = ModelCard(text if front is not None else "---\n---\n" + text, ignore_metadata_errors=True)
    data = model_card.data
    before = data.to_dict()
    if hub_base and data.get("base_model") != hub_base:
        data.base_model = hub_base
        done.filled.append(f"base_model {hub_base}")
    elif not hub_base:
        data.base_model = None  # '' or a local path: the Hub wants an id there
    tags = [t for t in data.get("tags") or [] if not _names_a_local_base(t)]
    missing_tags = [t for t in REQUIRED_TAGS if t not in tags]
    data.tags = tags + missing_tags
    if missing_tags:
        done.filled.append(f"tags {', '.join(missing_tags)}")
    if not data.get("library_name"):
        data.library_name = "peft" if kind == "adapter" else "transformers"
        done.filled.append(f"library_name {data.library_name}")
    if license or not data.get("license"):
        data.license = license or chosen_license or "other"
        if data.license != before.get("license"):
            done.filled.append(f"license {data.license}")
        if not (license or chosen_license):
            done.warnings.append(
                "no license is known; the card says 'other' (pass --license, e.g. apache-2.0)"
            )
    datasets = data.get("datasets")
    datasets = [datasets] if isinstance(datasets, str) else list(datasets or [])
    local_data = [d for d in datasets if not is_hub_id(d)]
    if local_data:
        data.datasets = [d for d in datasets if is_hub_id(d)] or None
        done.warnings.append(
            f"datasets {', '.join(Path(str(d)).name for d in local_data)} are not Hub ids; left out of the metadata"
        )
    if front is None:
        done.filled.append("a metadata block on top of README.md")
    done.text = str(model_card) if data.to_dict() != before or front is None else text
    _validate(done, kind, path, local_base)
    return done


def _validate(done: CompletedCard, kind: str, path: Path, local_base: str | None) -> None:
    """Refuse what is still wrong; keep the validator's warnings that say something new."""
    found = validate_card_text(done.text, is_adapter=kind == "adapter", where=path)
    done.warnings += [w for w in found if not (local_base and "base_model" in w)]
