"""`moetune info`: the architecture of a MODEL and the module groups adapters can target.

The model is built on the meta device from its config, so any size (including `preset:full` and
hub checkpoints, of which only config.json is fetched) answers in seconds with no weight memory.
An adapter folder is not a model: `info` then prints a short summary of the adapter (its base, rank,
what it adapts, its size) and how to use it, as `peft`'s own config printout would, with exit 0.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import PretrainedConfig, PreTrainedModel

from finetune.errors import MoetuneError
from finetune.loading import build_empty_model, load_config

# Config attribute names the transformers MoE families use for the same idea.
EXPERT_COUNT_KEYS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")
SHARED_EXPERT_KEYS = ("num_shared_experts", "n_shared_experts")


def _first_attr(config: PretrainedConfig, keys: tuple[str, ...], default: Any = 0) -> Any:
    for key in keys:
        value = getattr(config, key, None)
        if value is not None:
            return value
    return default


def _shared_experts(config: PretrainedConfig) -> int:
    count = _first_attr(config, SHARED_EXPERT_KEYS, None)
    if count is not None:
        return int(count)
    return 1 if getattr(config, "shared_expert_intermediate_size", 0) else 0  # Qwen2-MoE style


def _attention_kind(config: PretrainedConfig) -> str:
    if hasattr(config, "layer_attention_types"):  # the built-in model: per-layer choice
        kinds = sorted(set(config.layer_attention_types))
        return "+".join(kinds)
    if getattr(config, "kv_lora_rank", None):
        return "mla"
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    if getattr(config, "sliding_window", None):
        return "sliding_window"
    return "gqa" if kv and kv < heads else "mha"


def _routed_expert_params(model: PreTrainedModel) -> int:
    """Parameters stored in routed experts (fused 3D tensors or per-expert ModuleLists)."""
    total = 0
    for name, param in model.named_parameters():
        parts = name.split(".")
        if "experts" in parts and "shared_experts" not in parts:
            total += param.numel()
    return total


def parameter_counts(model: PreTrainedModel, config: PretrainedConfig) -> tuple[int, int]:
    """(total, active per token): active counts routed experts at top_k / num_experts."""
    total = sum(p.numel() for p in model.parameters())
    experts = _first_attr(config, EXPERT_COUNT_KEYS, 0)
    top_k = getattr(config, "num_experts_per_tok", 0) or 0
    routed = _routed_expert_params(model)
    active = total - routed + (routed * top_k // experts if experts else 0)
    return total, active


@dataclass
class AdapterInfo:
    """What `moetune info ADAPTER` reports: an adapter's recorded base, rank, targets and size."""

    adapter: str
    base_model: str | None
    peft_type: str | None
    r: int | None
    lora_alpha: int | float | None
    target_modules: list[str]
    target_parameters: list[str]
    modules_to_save: list[str]
    multimodal: list[str]  # encoders the adapter trains
    tensors: int
    values: int
    size_bytes: int
    kind: ClassVar[str] = "adapter"

    def as_dict(self) -> dict[str, Any]:
        """The JSON of `moetune info --json` (its keys are documented; scripts may rely on them)."""
        return {"kind": self.kind, **dataclasses.asdict(self)}

    def __str__(self) -> str:
        """The adapter summary: what it is, its base, what it adapts, and the next commands."""
        base = self.base_model or "(not recorded)"
        rows = [
            ("base", base),
            ("rank / alpha", f"{self.r} / {self.lora_alpha}"),
            ("LoRA modules", f"{len(self.target_modules)} target_modules entries"),
            ("LoRA parameters", f"{len(self.target_parameters)} (fused experts or 2D weights)"),
            ("trained whole", ", ".join(self.modules_to_save) or "none"),
            ("weights", f"{self.tensors} tensors, {self.values:,} values, {self.size_bytes / 1e6:.2f} MB"),
        ]
        if self.multimodal:
            rows.append(("encoders", ", ".join(self.multimodal)))
        width = max(len(k) for k, _ in rows)
        kind = {"LORA": "LoRA"}.get(self.peft_type, self.peft_type or "PEFT")
        lines = [f"{self.adapter}: a {kind} adapter (PEFT), not a model"]
        lines += [f"  {k:<{width}}  {v}" for k, v in rows]
        model = base if self.base_model else "BASE"
        lines.append(f"the base's architecture: moetune info {model}")
        lines.append(f'use it: moetune generate {model} --adapter {self.adapter} --prompt "..."')
        return "\n".join(lines)


@dataclass
class ModelInfo:
    """What `moetune info MODEL` reports: the architecture and the module groups adapters can target."""

    model: str
    model_type: str
    num_layers: int
    hidden_size: int
    num_experts: int
    top_k: int
    num_shared_experts: int
    attention: str
    params_total: int
    params_active: int  # per token: routed experts at top_k / num_experts
    targets: dict[str, int]  # adapter target group -> modules or parameters
    encoders: list[str] | None  # modality encoders, when the model has them
    dtype: str  # the checkpoint's
    weight_bytes: dict[str, int]  # per target group, in `dtype`
    quantize: str | None = None  # int8 / nf4: the routed experts' storage for weight_bytes_quantized
    weight_bytes_quantized: dict[str, int] | None = None
    kind: ClassVar[str] = "model"

    def as_dict(self) -> dict[str, Any]:
        """The JSON of `moetune info --json` (its keys are documented; scripts may rely on them);
        the optional keys are left out when they do not apply."""
        optional = ("encoders", "quantize", "weight_bytes_quantized")
        body = {k: v for k, v in dataclasses.asdict(self).items() if k not in optional or v is not None}
        return {"kind": self.kind, **body}

    def __str__(self) -> str:
        """A two-column table of the architecture, then the adaptable groups with their counts."""
        rows = [
            ("family", self.model_type),
            ("layers", self.num_layers),
            ("hidden", self.hidden_size),
            ("experts", self.num_experts),
            ("top-k", self.top_k),
            ("shared experts", self.num_shared_experts),
            ("attention", self.attention),
            ("params total", f"{_human(self.params_total)} ({self.params_total:,})"),
            ("params active/token", f"{_human(self.params_active)} ({self.params_active:,})"),
        ]
        if self.encoders:
            rows.append(("encoders", ", ".join(self.encoders)))
        width = max(len(k) for k, _ in rows)
        lines = [f"{self.model}"] + [f"  {k:<{width}}  {v}" for k, v in rows]
        lines.append("adapter target groups (modules or parameters):")
        group_width = max((len(g) for g in self.targets), default=0)
        lines += [f"  {group:<{group_width}}  {count}" for group, count in self.targets.items()]
        before, after = self.weight_bytes, self.weight_bytes_quantized
        header = f"  {'':<15}{self.dtype:>14}"
        if after:
            header += f"{'experts ' + self.quantize:>16}"
        lines.append("weights by group (bytes):")
        lines.append(header)
        for group in before:
            row = f"  {group:<15}{_bytes(before[group]):>14}"
            lines.append(row + (f"{_bytes(after[group]):>16}" if after else ""))
        total = f"  {'total':<15}{_bytes(sum(before.values())):>14}"
        lines.append(total + (f"{_bytes(sum(after.values())):>16}" if after else ""))
        return "\n".join(lines)


def adapter_info(folder: Path) -> AdapterInfo:
    """A PEFT adapter folder's recorded base, rank, targets and size."""
    from adapters.peft_format import ADAPTER_WEIGHTS, saved_shapes
    from adapters.provenance import adapted_names, multimodal_parts, recorded_base

    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as err:
        raise MoetuneError(
            f"{folder / 'adapter_config.json'} is not valid JSON ({err}); re-save the adapter"
        ) from None
    weights, shapes = folder / ADAPTER_WEIGHTS, saved_shapes(folder)
    values, tensors = sum(math.prod(shape) for shape in shapes.values()), len(shapes)
    modules = config.get("target_modules") or []
    parameters = config.get("target_parameters") or []
    return AdapterInfo(
        adapter=str(folder),
        base_model=recorded_base(config),
        peft_type=config.get("peft_type"),
        r=config.get("r"),
        lora_alpha=config.get("lora_alpha"),
        target_modules=[modules] if isinstance(modules, str) else sorted(modules),
        target_parameters=sorted(parameters),
        modules_to_save=sorted(config.get("modules_to_save") or []),
        multimodal=[p for p in multimodal_parts(adapted_names(folder, config)) if p != "projector"],
        tensors=tensors,
        values=values,
        size_bytes=weights.stat().st_size if weights.is_file() else 0,
    )


def model_info(spec: str, quantize: str | None = None) -> ModelInfo | AdapterInfo:
    """The architecture of MODEL (`moetune info`); `as_dict()` is its JSON, `str()` its table.

    An adapter folder gives `adapter_info` instead (its "kind" is "adapter"; a model's is "model").
    `weight_bytes` holds each adapter group's bytes in the checkpoint's dtype; with `quantize` (or for a
    folder saved with quantized experts) `weight_bytes_quantized` holds them with the experts stored
    int8 / NF4.
    """
    from adapters.targets import count_target_groups
    from finetune.loading import check_quantize
    from finetune.quantization.loading import quantization_of
    from finetune.quantization.memory import weight_bytes_by_group

    folder = Path(str(spec)).expanduser()
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        return adapter_info(folder)
    config = load_config(spec)
    method = check_quantize(quantize) or quantization_of(config)[1]
    model = build_empty_model(config)
    total, active = parameter_counts(model, config)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    modalities = getattr(config, "modalities", None)
    dtype = checkpoint_dtype(config)
    return ModelInfo(
        model=str(spec),
        model_type=config.model_type,
        num_layers=text_config.num_hidden_layers,
        hidden_size=text_config.hidden_size,
        num_experts=int(_first_attr(text_config, EXPERT_COUNT_KEYS, 0)),
        top_k=int(getattr(text_config, "num_experts_per_tok", 0) or 0),
        num_shared_experts=_shared_experts(text_config),
        attention=_attention_kind(text_config),
        params_total=total,
        params_active=active,
        targets=count_target_groups(model),
        encoders=list(modalities) if modalities else None,
        dtype=str(dtype).removeprefix("torch."),
        weight_bytes=weight_bytes_by_group(model, dtype.itemsize, None),
        quantize=method or None,
        weight_bytes_quantized=weight_bytes_by_group(model, dtype.itemsize, method) if method else None,
    )


def checkpoint_dtype(config: PretrainedConfig) -> torch.dtype:
    """The dtype the weights load in: the config's own (`dtype`), float32 when it names none."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
