"""Which base an adapter was trained on, and whether the base it is applied to is that one.

An adapter folder records its base in adapter_config.json `base_model_name_or_path` (PEFT's own
key): the MODEL spec it was trained on — `preset:NAME`, a hub id, or a local folder (absolute path).
The rule when it is applied to a base given by name (generate, merge, verify-merge, load_adapter):

- same name (a folder compared by its resolved path; a hub id also matches its hub cache snapshot
  folder): applied silently;
- a multimodal adapter (LoRA in `encoders.*`, trained `projectors`) on a base without those
  modules: refused, naming the modalities and the fix;
- the recorded base is a local folder that still exists and its config differs from the given base
  in a structural key (model type, widths, layers, heads, experts, top-k, modalities): refused in
  one line naming both;
- otherwise (a folder moved or copied elsewhere, a local copy of a hub model, a base named
  differently): one warning line naming both, and the adapter is applied when its shapes fit — a
  shape mismatch is refused by the loader itself. PEFT, LLaMA-Factory and axolotl never compare
  names at all; refusing on a different path would break moved folders for no gain.
- no recorded base (an adapter saved from a model built from a config): nothing to compare.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from adapters.errors import MoetuneError

logger = logging.getLogger("moetune")

# Config keys that change what the adapter means (and mostly its shapes) when they differ.
STRUCTURE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "moe_intermediate_size",
    "num_experts",
    "n_routed_experts",
    "num_local_experts",
    "num_experts_per_tok",
    "num_shared_experts",
    "n_shared_experts",
    "first_k_dense_replace",
    "modalities",
)
ENCODER_PREFIX = re.compile(r"(?:^|\.)encoders\.(\w+)")
PROJECTOR_NAMES = ("projectors", "prefix_projector", "fusion_gate", "contrastive")


def recorded_base(adapter_config: dict) -> str | None:
    """The base an adapter config names (`base_model_name_or_path`), or None when it names none."""
    value = adapter_config.get("base_model_name_or_path")
    return str(value) if value else None


def read_recorded_base(folder: str | os.PathLike) -> str | None:
    """`recorded_base` of folder/adapter_config.json (None when the file is missing or unreadable)."""
    try:
        return recorded_base(json.loads((Path(folder) / "adapter_config.json").read_text()))
    except (OSError, ValueError, AttributeError):
        return None


def _hub_id_of_cache_path(path: str) -> str | None:
    match = re.search(r"models--([^/]+?)--([^/]+)/snapshots/", Path(path).as_posix() + "/")
    return f"{match.group(1)}/{match.group(2)}" if match else None


def same_base(recorded: str, given: str) -> bool:
    """True when two MODEL names denote the same base (folders by resolved path, hub cache paths by id)."""
    if recorded == given:
        return True
    names = []
    for name in (recorded, given):
        path = Path(name).expanduser()
        names.append(str(path.resolve()) if path.exists() else name)
        names[-1] = _hub_id_of_cache_path(names[-1]) or names[-1]
    return names[0] == names[1]


def _config_of_folder(name: str) -> dict | None:
    path = Path(name).expanduser() / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def structural_differences(recorded_config: dict, given_config: dict) -> list[str]:
    """`key: recorded -> given` for the STRUCTURE_KEYS both configs set to different values."""
    return [
        f"{key} {recorded_config[key]!r} vs {given_config[key]!r}"
        for key in STRUCTURE_KEYS
        if key in recorded_config and key in given_config and recorded_config[key] != given_config[key]
    ]


def adapted_names(folder: str | os.PathLike, adapter_config: dict) -> list[str]:
    """Module names an adapter touches: its config's targets and its weight file's keys."""
    names: list[str] = []
    for key in ("target_modules", "modules_to_save"):
        value = adapter_config.get(key) or []
        names += [value] if isinstance(value, str) else list(value)
    from adapters.peft_format import SAVED_PREFIX, saved_shapes

    return names + [key.removeprefix(SAVED_PREFIX) for key in saved_shapes(folder)]


def multimodal_parts(names: Iterable[str]) -> list[str]:
    """The modality encoders / fusion modules among adapted names ("image", "audio", "projector", ...)."""
    found = []
    for name in names:
        match = ENCODER_PREFIX.search(name)
        part = match.group(1) if match else ("projector" if name.split(".")[0] in PROJECTOR_NAMES else None)
        if part and part not in found:
            found.append(part)
    return found


def _has_modules(model: Any, roots: Iterable[str]) -> bool:
    return any(hasattr(model, root) for root in roots)


def check_base(folder: str | os.PathLike, adapter_config: dict, model: Any, given: str | None) -> None:
    """Apply the module docstring's rule for `model` (loaded from `given`); raise or warn in one line."""
    folder = Path(folder)
    recorded = recorded_base(adapter_config)
    base = getattr(model, "get_base_model", lambda: model)()
    found = multimodal_parts(adapted_names(folder, adapter_config))
    parts = [p for p in found if p != "projector"]
    if found and not _has_modules(base, ("encoders", "projectors")):
        encoders = ", ".join(parts) or "modality"
        modalities = ",".join(p for p in parts if p in ("image", "audio", "text")) or "image"
        raise MoetuneError(
            f"{folder} is a multimodal adapter ({encoders} encoders) but {given or type(base).__name__} is a "
            f"text-only model; use the multimodal base it was trained on ({recorded or 'see its recipe.yaml'}), "
            f"e.g. a folder from `moetune init-model --preset tiny --modalities {modalities}`"
        )
    if not recorded or not given or same_base(recorded, given):
        return
    recorded_config = _config_of_folder(recorded)
    given_config = getattr(base, "config", None)
    if recorded_config is not None and given_config is not None:
        differences = structural_differences(recorded_config, given_config.to_dict())
        if differences:
            raise MoetuneError(
                f"{folder} was trained on {recorded}, whose config differs from {given} "
                f"({'; '.join(differences[:3])}); pass {recorded} (or a copy of it) as MODEL"
            )
    logger.warning(
        "warning: adapter %s was trained on %s, not %s; applying it because the shapes fit "
        "(make sure %s is a copy of that base)",
        folder,
        recorded,
        given,
        given,
    )


def mismatch_error(folder: str | os.PathLike, adapter_config: dict, given: str, detail: str) -> MoetuneError:
    """The one-line refusal when an adapter does not fit a base: names both, and the fix."""
    recorded = recorded_base(adapter_config)
    trained = f"trained on {recorded}" if recorded else "trained on another base"
    fix = f"pass {recorded} as MODEL" if recorded else "load it onto the base model it was trained on"
    return MoetuneError(f"{folder}: adapter {trained} does not fit {given} ({detail}); {fix}")
