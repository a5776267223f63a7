"""The LoRA factors of a PEFT adapter folder, per module and per fused expert weight, from the files alone.

Exporters need the factors and each one's scaling without building the base model (a serving export
of a 30B model should not load 30B weights). PEFT stores:
- a module's LoRA (attention, shared experts, a 2D router weight) as `<module>.lora_A.weight`
  (r, in) and `<module>.lora_B.weight` (out, r);
- a fused experts weight [E, ...] (`target_parameters`) as one lora_A (r*E, in) and one lora_B
  (out, r*E): expert e owns rows e*r:(e+1)*r of A and columns e, e+E, e+2E, ... of B
  (`ParamWrapper.get_delta_factors`). Two weights of one experts module nest: the first wrapped
  (`gate_up_proj`) sits deeper, at `experts.base_layer.lora_A`, `down_proj` at `experts.lora_A`.
Ranks and alphas follow PEFT's `rank_pattern` / `alpha_pattern` (first key `k` with
`re.match(rf"(.*\\.)?({k})$", name)`, `peft.utils.other.get_pattern_key`) and `use_rslora`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from adapters.errors import MoetuneError

_FUSED_KEY = re.compile(r"^(?P<prefix>.*\.experts)\.(?:base_layer\.)*lora_(?P<ab>[AB])\.weight$")
_MODULE_KEY = re.compile(r"^base_model\.model\.(?P<name>.+)\.lora_(?P<ab>[AB])\.weight$")


@dataclass
class Factors:
    """One LoRA pair and its scaling (delta = scaling * b @ a).

    Module: a (r, in), b (out, r). Fused experts weight: a (E, r, in), b (E, out, r), in the math
    orientation (out, in) whatever the base stores (GPT-OSS keeps its experts as [E, in, out]).
    """

    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[-2]


@dataclass
class AdapterFactors:
    """Every LoRA pair of an adapter folder, keyed by the base model's names."""

    source: Path
    config: dict
    modules: dict[str, Factors] = field(default_factory=dict)  # "model.layers.0.self_attn.q_proj" -> pair
    experts: dict[str, dict[str, Factors]] = field(default_factory=dict)  # experts module -> {param: pair}
    full: list[str] = field(default_factory=list)  # weights of modules_to_save (trained whole, not LoRA)


def read_adapter_files(folder: str | Path) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    """(folder, adapter_config.json, tensors); one clear line when it is not an adapter folder."""
    folder = Path(folder)
    config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise MoetuneError(
            f"{folder}: not an adapter folder (needs adapter_config.json and adapter_model.safetensors)"
        )
    return folder, json.loads(config_file.read_text()), load_file(str(weights_file))


def read_factors(folder: str | Path) -> AdapterFactors:
    """All LoRA pairs of a PEFT adapter folder with their scalings (see the module docstring)."""
    source, config, weights = read_adapter_files(folder)
    result = AdapterFactors(source, config)
    wrappers = expert_param_keys(config, weights, source)
    used = set()
    for param, (key_a, key_b) in wrappers.items():
        prefix, _, pname = param.rpartition(".")
        weight_a, weight_b = weights[key_a], weights[key_b]
        rank = pattern_value(config.get("rank_pattern"), param, config["r"])
        rows = weight_a.shape[0]
        if rows % rank or weight_b.shape[1] != rows:
            raise MoetuneError(
                f"{source}: rank mismatch at {param}: lora_A has {rows} rows and lora_B "
                f"{weight_b.shape[1]} columns, not r={rank} x experts; adapter_config.json does not "
                "describe these weights (save the adapter again)"
            )
        num_experts = rows // rank
        lora_a = weight_a.view(num_experts, rank, -1)  # (E, r, in)
        lora_b = weight_b.view(weight_b.shape[0], rank, num_experts).permute(2, 0, 1)  # (E, out, r)
        result.experts.setdefault(prefix, {})[pname] = Factors(lora_a, lora_b, _scaling(config, param, rank))
        used.update((key_a, key_b))
    parameter_targets = set(config.get("target_parameters") or [])
    for key in sorted(set(weights) - used):
        if _trained_whole(key, config.get("modules_to_save") or []):
            result.full.append(key)
            continue
        match = _MODULE_KEY.match(key)
        if match is None:
            raise MoetuneError(
                f"{source}: {key} is not a LoRA pair weight (a fully trained module, DoRA or embedding "
                "LoRA); serving layouts carry LoRA pairs only: merge this adapter instead (moetune merge)"
            )
        if match["ab"] == "B":
            continue
        name = match["name"]
        key_b = key.replace(".lora_A.weight", ".lora_B.weight")
        if key_b not in weights:
            raise MoetuneError(f"{source}: {key} has no lora_B partner; the adapter file is incomplete")
        # a 2D parameter target (a router weight) is matched by its parameter name, a module by its name
        pattern_key = f"{name}.weight" if f"{name}.weight" in parameter_targets else name
        rank = pattern_value(config.get("rank_pattern"), pattern_key, config["r"])
        lora_a, lora_b = weights[key], weights[key_b]
        if lora_a.shape[0] != rank or lora_b.shape[1] != rank:
            raise MoetuneError(
                f"{source}: rank mismatch at {name}: lora_A {tuple(lora_a.shape)}, lora_B "
                f"{tuple(lora_b.shape)}, adapter_config.json says r={rank} (save the adapter again)"
            )
        result.modules[name] = Factors(lora_a, lora_b, _scaling(config, pattern_key, rank))
    return result


def _trained_whole(key: str, modules_to_save: list[str]) -> bool:
    """A weight of a module PEFT trains whole (`modules_to_save` entries match a name's end)."""
    module = key.removeprefix("base_model.model.").rpartition(".")[0]
    return any(module == m or module.endswith(f".{m}") for m in modules_to_save)


def _scaling(config: dict, key: str, rank: int) -> float:
    alpha = pattern_value(config.get("alpha_pattern"), key, config["lora_alpha"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def pattern_value(pattern: dict | None, name: str, default):
    """PEFT's rank / alpha pattern lookup: the first key that matches the end of `name`."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def expert_params(config: dict) -> list[str]:
    """The fused expert weights among target_parameters (a 2D router / Linear weight stays as it is)."""
    return [p for p in config.get("target_parameters") or [] if p.rpartition(".")[0].endswith(".experts")]


def nesting_order(names: list[str]) -> list[str]:
    """Fused experts register the up projection before down_proj; PEFT wraps in that order."""
    return sorted(names, key=lambda n: 0 if not n.endswith("down_proj") else 1)


def expert_param_keys(config: dict, weights: dict, source: Path) -> dict[str, tuple[str, str]]:
    """Fused expert parameter name -> (lora_A key, lora_B key) in the file.

    PEFT nests one ParamWrapper per targeted parameter of a module, the first wrapped deepest
    (`experts.base_layer.lora_A` for gate_up_proj, `experts.lora_A` for down_proj).
    """
    by_module: dict[str, list[tuple[int, str, str]]] = {}
    for key in weights:
        match = _FUSED_KEY.match(key)
        if match and match["ab"] == "A":
            depth = key.count(".base_layer.")
            by_module.setdefault(match["prefix"], []).append((depth, key, key.replace("lora_A", "lora_B")))
    result = dict.fromkeys(expert_params(config))
    for prefix, entries in by_module.items():
        module = prefix.removeprefix("base_model.model.")
        order = nesting_order([p for p in result if p.rpartition(".")[0] == module])
        entries = sorted(entries, key=lambda t: -t[0])  # deepest first
        if len(order) != len(entries):
            raise MoetuneError(
                f"{source}: {module} has {len(entries)} LoRA pairs for {len(order)} targeted weights"
            )
        for param, (_, key_a, key_b) in zip(order, entries):
            result[param] = (key_a, key_b)
    missing = [p for p, v in result.items() if v is None]
    if missing:
        raise MoetuneError(f"{source}: no LoRA weights for targeted parameter {missing[0]}")
    return result
