"""PEFT's LoRA adapter folder, read from the files alone, and its fused-expert factor layout.

Every part of moetune that reads, splits, packs or folds LoRA factors does it here: the routed
expert path (`adapters.experts`), ESFT zeroing (`adapters.inject`), merging, combining and exporting.
(`adapters.serving_reader` is the one exception, on purpose: it re-derives the servers' rules.)

What PEFT writes (`save_pretrained`):
- `adapter_config.json` (r, lora_alpha, rank_pattern / alpha_pattern, use_rslora, target_modules,
  target_parameters, modules_to_save, ...) and `adapter_model.safetensors`, keys under
  `base_model.model.`;
- a module's LoRA (Linear, Conv2d, or a 2D parameter such as a router weight) as
  `<module>.lora_A.weight` (r, in) and `<module>.lora_B.weight` (out, r);
- a fused experts weight [E, ...] (`target_parameters`, `lora.ParamWrapper`) as one lora_A (r*E, in)
  and one lora_B (out, r*E): expert e owns rows e*r:(e+1)*r of A (expert-major) and columns
  e, e+E, e+2E, ... of B (rank-major), see `ParamWrapper.get_delta_factors`. Two weights of one
  experts module nest: the first wrapped sits deeper (`experts.base_layer.lora_A` for gate_up_proj,
  `experts.lora_A` for down_proj);
- the weights of modules trained whole (`modules_to_save`) under the module's own name.
Ranks and alphas follow `rank_pattern` / `alpha_pattern` (PEFT's `get_pattern_key`: the first key k
with `re.match(rf"(.*\\.)?({k})$", name)`), keyed by the module name, or by `<module>.<parameter>` for
a parameter target; scaling = alpha / r, or alpha / sqrt(r) with `use_rslora`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapters.errors import MoetuneError
from adapters.hub import PICKLE_SUFFIXES

SAVED_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Adapter-config features whose weights are not plain LoRA factors: refused with the feature named.
UNSUPPORTED_FEATURES = {
    "use_dora": "DoRA",
    "modules_to_save": "modules_to_save (fully trained modules)",
    "trainable_token_indices": "trainable tokens",
    "layer_replication": "layer replication",
    "lora_bias": "LoRA bias",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)",
}


# ----------------------------------------------------------------------------- the fused-expert layout


def split_experts(lora_a: torch.Tensor, lora_b: torch.Tensor, num_experts: int):
    """PEFT's (r*E, in), (out, r*E) -> per expert (E, r, in), (E, out, r); views, so writes go through.

    delta_e = scaling * B[e] @ A[e]. A's rows are expert-major (row e*r + k), B's columns rank-major
    (column k*E + e).
    """
    a3 = lora_a.view(num_experts, -1, lora_a.shape[-1])  # (E, r, in)
    b3 = lora_b.view(lora_b.shape[0], -1, num_experts).permute(2, 0, 1)  # (out, r, E) -> (E, out, r)
    return a3, b3


def pack_experts(a3: torch.Tensor, b3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `split_experts`: (E, r, in), (E, out, r) -> lora_A (r*E, in), lora_B (out, r*E)."""
    lora_a = a3.reshape(-1, a3.shape[-1]).contiguous()
    lora_b = b3.permute(1, 2, 0).reshape(b3.shape[1], -1).contiguous()  # (out, r, E) -> (out, r*E)
    return lora_a, lora_b


def experts_with_lora(a3: torch.Tensor) -> list[bool]:
    """Per expert: does its A block hold anything? An ESFT selection leaves the others all zero."""
    with torch.no_grad():
        return a3.reshape(a3.shape[0], -1).ne(0).any(dim=1).tolist()


def nesting_order(names: list[str]) -> list[str]:
    """Fused experts register the up projection before down_proj; PEFT wraps in that order."""
    return sorted(names, key=lambda n: 0 if not n.endswith("down_proj") else 1)


def wrapper_keys(module: str, params: list[str]) -> dict[str, str]:
    """{parameter: saved module path} of the nested ParamWrappers of one module (first wrapped deepest)."""
    ordered = nesting_order(params)
    depth = {p: len(ordered) - 1 - i for i, p in enumerate(ordered)}
    return {p: f"{SAVED_PREFIX}{module}" + ".base_layer" * depth[p] for p in params}


def module_name(saved: str) -> str:
    """The base model's module a saved key or module path belongs to:
    "base_model.model.model.layers.1.mlp.experts.base_layer.lora_A.weight" -> "model.layers.1.mlp.experts"."""
    if ".lora_" in saved:
        saved = saved.rpartition(".lora_")[0]
    return saved.removeprefix(SAVED_PREFIX).replace(".base_layer", "")


def expert_params(config: dict) -> list[str]:
    """The fused expert weights among target_parameters (a 2D router / Linear weight stays as it is)."""
    return [p for p in config.get("target_parameters") or [] if p.rpartition(".")[0].endswith(".experts")]


def pattern_value(pattern: dict | None, name: str, default):
    """PEFT's rank / alpha pattern lookup: the value of the first key that matches the end of `name`."""
    from peft.utils.other import get_pattern_key

    pattern = pattern or {}
    return pattern.get(get_pattern_key(list(pattern), name), default)


def lora_scaling(config: dict, name: str, rank: int) -> float:
    """The scaling PEFT gives the LoRA of `name` (a module, or `<module>.<parameter>`)."""
    alpha = pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


@dataclass
class LoraPair:
    """One saved LoRA pair as PEFT writes it, with what adapter_config.json says about it."""

    key: str  # saved module path, e.g. "base_model.model.model.layers.1.mlp.experts.base_layer"
    lora_A: torch.Tensor  # (r*E, in)  (Conv2d: (r, in, kh, kw))
    lora_B: torch.Tensor  # (out, r*E)  (Conv2d: (out, r, 1, 1))
    rank: int
    scaling: float
    num_experts: int  # 1 for a Linear layer or a 2D parameter
    param: str | None = None  # "<module>.<parameter>" of a target_parameters pair; None for a module

    @property
    def module(self) -> str:
        """The base model's module name ("model.layers.1.mlp.experts")."""
        return module_name(self.key)

    def split(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per expert (E, r, in), (E, out, r) (E = 1 for a module), optionally cast to `dtype`."""
        a, b = self.lora_A, self.lora_B
        if dtype is not None:
            a, b = a.to(dtype), b.to(dtype)
        return split_experts(a, b, self.num_experts)

    def delta(self) -> torch.Tensor:
        """The weight change in float32, (E, out, in) (E = 1 for a Linear layer)."""
        a3, b3 = self.split(torch.float32)
        return self.scaling * torch.bmm(b3, a3)


# ----------------------------------------------------------------------------- reading a folder


def read_adapter_config(
    adapter_dir: str | os.PathLike, *, plain_lora: bool = True, allow: tuple[str, ...] = ()
) -> dict:
    """adapter_config.json of a PEFT adapter folder, checked (folder, weights file, JSON).

    plain_lora: also refuse other PEFT methods and the UNSUPPORTED_FEATURES, except those in `allow`
    (the caller handles them itself: merge writes modules_to_save in place)."""
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise MoetuneError(
            f"adapter folder {folder} does not exist; give the folder that holds {ADAPTER_CONFIG}"
        )
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise MoetuneError(
            f"{folder} is not an adapter folder: it has no {ADAPTER_CONFIG} (give the folder save_pretrained wrote)"
        )
    if not weights_path.is_file():
        pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        hint = (
            f" (found {pickles[0]}: pickle files are not loaded; re-save with safetensors)" if pickles else ""
        )
        raise MoetuneError(f"{folder} has no {ADAPTER_WEIGHTS}{hint}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise MoetuneError(f"{config_path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise MoetuneError(f"{config_path} must hold a JSON object")
    if not plain_lora:
        return config
    if config.get("peft_type", "LORA") != "LORA":
        raise MoetuneError(
            f"{folder} is a {config.get('peft_type')} adapter; moetune merges LoRA adapters only"
        )
    for key, feature in UNSUPPORTED_FEATURES.items():
        if config.get(key) and key not in allow:
            raise MoetuneError(
                f"{folder} uses {feature} ({key} in {ADAPTER_CONFIG}); moetune merges plain LoRA only"
            )
    return config


def read_adapter(
    adapter_dir: str | os.PathLike, *, plain_lora: bool = True, allow: tuple[str, ...] = ()
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, the tensors of adapter_model.safetensors); see `read_adapter_config`."""
    from safetensors.torch import load_file

    config = read_adapter_config(adapter_dir, plain_lora=plain_lora, allow=allow)
    weights_path = Path(adapter_dir) / ADAPTER_WEIGHTS
    try:
        tensors = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types
        raise MoetuneError(f"cannot read {weights_path}: {err}") from err
    return config, tensors


def saved_shapes(adapter_dir: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """The names and shapes saved in adapter_model.safetensors, from its header (no tensor is read);
    {} when the folder has no such file."""
    from safetensors import safe_open

    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not weights.is_file():
        return {}
    with safe_open(str(weights), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118


def trained_whole(tensors: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """The tensors of modules PEFT trains whole: a `modules_to_save` entry matches the end of the name of
    the module or of one of its parents (PEFT saves every weight of such a module under its own name)."""
    names = config.get("modules_to_save") or []

    def whole(key: str) -> bool:
        module = key.removeprefix(SAVED_PREFIX).rpartition(".")[0]
        return ".lora_" not in key and any(f".{m}." in f".{module}." for m in names)

    return {key: tensor for key, tensor in tensors.items() if whole(key)}


def group_factors(
    tensors: dict[str, torch.Tensor], where: str, *, allow_conv: bool = False
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{saved module path: (lora_A, lora_B)}; any other tensor is refused with its name.

    `allow_conv`: also accept Conv2d LoRA (A (r, in, kh, kw), B (out, r, 1, 1)); merging folds it in,
    combining does not handle it."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        module, _, leaf = name.rpartition(".lora_")
        if leaf not in ("A.weight", "B.weight"):
            raise MoetuneError(
                f"{where} holds '{name}', which is not a LoRA factor (lora_A/lora_B) (DoRA, embedding LoRA "
                "or a fully trained module); moetune handles plain LoRA on Linear layers and expert tensors only"
            )
        pairs.setdefault(module, {})[leaf[0]] = tensor
    out = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise MoetuneError(f"{where} has no {missing} for {module}; the adapter file is incomplete")
        a, b = pair["A"], pair["B"]
        if a.dim() == 4 and allow_conv and b.dim() == 4 and a.shape[0] == b.shape[1]:
            out[module] = (a, b)
            continue
        if a.dim() == 4:  # nn.Conv2d LoRA, e.g. on a ResNet image encoder
            raise MoetuneError(
                f"{where}: {module} is LoRA on a Conv2d layer, which combining adapters does not handle; "
                "leave the image encoder's convolutions out of adapter.targets to combine these adapters"
            )
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise MoetuneError(
                f"{where}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, which do not fit"
            )
        out[module] = (a, b)
    return out


def resolve_pairs(
    config: dict, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], where: str
) -> dict[str, LoraPair]:
    """{saved module path: LoraPair}: which parameter each pair adapts, its rank, scaling and experts.

    The pairs of one module are its nested ParamWrappers, deepest (first wrapped) first, and take the
    module's target_parameters in `nesting_order`; a module in target_modules with one pair is a
    module LoRA. The rank comes from adapter_config.json and must divide lora_A's rows into experts.
    """
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    fields = set(LoraConfig.__dataclass_fields__)
    try:
        lora_config = LoraConfig(**{k: v for k, v in config.items() if k in fields and k != "peft_type"})
    except (TypeError, ValueError) as err:
        raise MoetuneError(f"{where}/{ADAPTER_CONFIG} is not a LoRA config PEFT accepts: {err}") from err
    targets = [t.rpartition(".") for t in config.get("target_parameters") or []]
    groups: dict[str, list[str]] = {}
    for key in pairs:
        groups.setdefault(module_name(key), []).append(key)
    resolved: dict[str, LoraPair] = {}
    for module, keys in groups.items():
        keys.sort(key=lambda k: -k.count(".base_layer"))  # innermost (first wrapped) first
        params = nesting_order(
            list(
                dict.fromkeys(
                    p for part, _, p in targets if not part or module == part or module.endswith("." + part)
                )
            )
        )
        if len(keys) == 1 and (not params or check_target_module_exists(lora_config, module)):
            names: list[str | None] = [None]
        elif len(keys) == len(params):
            names = list(params)
        else:
            raise MoetuneError(
                f"{where}: {module} has {len(keys)} LoRA pairs for {len(params)} targeted weights "
                f"({', '.join(params) or 'none'}); is {ADAPTER_CONFIG} the one saved with it?"
            )
        experts = set()
        for key, name in zip(keys, names):
            lora_a, lora_b = pairs[key]
            pattern_key = module if name is None else f"{module}.{name}"
            rank = int(pattern_value(config.get("rank_pattern"), pattern_key, config.get("r", 8)))
            rows = lora_a.shape[0]
            if rows % rank or (name is None and rows != rank):
                raise MoetuneError(
                    f"{where}: rank mismatch at {pattern_key}: lora_A {tuple(lora_a.shape)}, lora_B "
                    f"{tuple(lora_b.shape)}, {ADAPTER_CONFIG} says r={rank}; it does not describe these "
                    "weights (save the adapter again)"
                )
            experts.add(rows // rank)
            param = None if name is None else pattern_key
            resolved[key] = LoraPair(
                key, lora_a, lora_b, rank, lora_scaling(config, pattern_key, rank), rows // rank, param
            )
        if len(experts) > 1:
            raise MoetuneError(
                f"{where}: the LoRA pairs of {module} give {sorted(experts)} experts under the ranks of "
                f"{ADAPTER_CONFIG}; is it the one saved with these weights?"
            )
    return resolved


def load_pairs(adapter_dir: str | os.PathLike) -> tuple[dict, dict[str, LoraPair]]:
    """(adapter config, {saved module path: LoraPair}) of a plain PEFT LoRA adapter folder."""
    config, tensors = read_adapter(adapter_dir)
    return config, resolve_pairs(config, group_factors(tensors, str(adapter_dir)), str(adapter_dir))


# ----------------------------------------------------------------------------- per-expert view


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
    """Every LoRA pair of an adapter folder, keyed by the base model's names (what exporters need)."""

    source: Path
    config: dict
    modules: dict[str, Factors] = field(default_factory=dict)  # "model.layers.0.self_attn.q_proj" -> pair
    experts: dict[str, dict[str, Factors]] = field(default_factory=dict)  # experts module -> {param: pair}
    full: list[str] = field(default_factory=list)  # weights of modules_to_save (trained whole, not LoRA)


def read_factors(folder: str | os.PathLike) -> AdapterFactors:
    """All LoRA pairs of a PEFT adapter folder with their scalings, without building the base model
    (a serving export of a 30B model should not load 30B weights)."""
    config, tensors = read_adapter(folder, plain_lora=False)
    source = Path(folder)
    full = trained_whole(tensors, config)
    rest = {k: v for k, v in tensors.items() if k not in full}
    result = AdapterFactors(source, config, full=sorted(full))
    for pair in resolve_pairs(config, group_factors(rest, str(source)), str(source)).values():
        if pair.param in expert_params(config) or (pair.param and pair.num_experts > 1):
            prefix, _, name = pair.param.rpartition(".")
            result.experts.setdefault(prefix, {})[name] = Factors(*pair.split(), pair.scaling)
        else:
            result.modules[pair.module] = Factors(pair.lora_A, pair.lora_B, pair.scaling)
    for param in expert_params(config):
        prefix, _, name = param.rpartition(".")
        if name not in result.experts.get(prefix, {}):
            raise MoetuneError(f"{source}: no LoRA weights for targeted parameter {param}")
    return result
