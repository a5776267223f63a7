"""Find what LoRA can adapt in an MoE model, by group, and report what an adapter adapted.

Groups (the names recipes use):
- `attention`: every nn.Linear inside a decoder layer's attention (q/k/v/o, DeepSeek's MLA
  q_a_proj / q_b_proj / kv_a_proj_with_mqa / kv_b_proj, gates);
- `experts`: the routed experts' fused 3D weights (`gate_up_proj` or ungated `up_proj`, and
  `down_proj`; [E, out, in] or transposed [E, in, out]) as PEFT `target_parameters`; a
  non-fused experts ModuleList contributes its nn.Linear modules instead;
- `shared_experts`: nn.Linear inside `shared_experts` / `shared_expert`;
- `router`: the gating network (`mlp.gate` / `mlp.router`): its nn.Linear, or its 2D weight;
- `dense_mlp`: nn.Linear of the feed-forward of dense (non-MoE) decoder layers;
- multimodal models only: `encoders` (LoRA on the nn.Linear / nn.Conv2d of the modality encoders
  under `encoders.`) and `projector` (the modality projections, fusion gate, prefix projector,
  contrastive temperature and classification head, trained fully and saved as PEFT
  `modules_to_save`).

Decoder groups come from the decoder layers only (a ModuleList whose items have attention and an
`mlp`-like child, outside any encoder), so modality encoders never end up in `attention` by
accident. Raw module or parameter names stay possible.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from adapters.errors import MoetuneError

GROUPS = ("attention", "experts", "shared_experts", "router", "dense_mlp")
MULTIMODAL_GROUPS = ("encoders", "projector")
ALL_GROUPS = GROUPS + MULTIMODAL_GROUPS
ENCODER_ROOTS = ("encoders",)  # where modality encoders live (the built-in multimodal model)
PROJECTOR_NAMES = ("projectors", "prefix_projector", "fusion_gate", "contrastive", "classifier")
ATTENTION_NAMES = ("self_attn", "attention", "attn")
FFN_NAMES = ("mlp", "block_sparse_moe", "feed_forward", "moe")
ROUTER_NAMES = ("gate", "router")
SHARED_NAMES = ("shared_experts", "shared_expert")
EXPERT_PARAM_NAMES = ("gate_up_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Target:
    """One adaptable thing: a module (nn.Linear) or a parameter (fused experts, router weight)."""

    name: str  # full module name, or full parameter name for kind == "parameter"
    group: str
    layer: int  # decoder layer index; -1 outside the decoder (encoders, projector)
    kind: str  # "module" (LoRA) | "parameter" (LoRA on a weight) | "full" (trained whole)
    numel: int  # base weights it covers


def _unwrap(module: nn.Module) -> nn.Module:
    """See through PEFT wrappers (lora layers, ParamWrapper, ModulesToSaveWrapper)."""
    while True:
        if hasattr(module, "base_layer") and isinstance(module.base_layer, nn.Module):
            module = module.base_layer
        elif hasattr(module, "original_module") and isinstance(module.original_module, nn.Module):
            module = module.original_module
        else:
            return module


def _children(module: nn.Module) -> dict[str, nn.Module]:
    return {name: _unwrap(child) for name, child in _unwrap(module).named_children()}


def _linears(module: nn.Module, prefix: str) -> list[tuple[str, nn.Linear]]:
    """nn.Linear modules below `module` (through PEFT wrappers), with clean names."""
    found = []
    module = _unwrap(module)
    if isinstance(module, nn.Linear):
        return [(prefix, module)]
    for name, child in module.named_children():
        if name in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "modules_to_save"):
            continue
        found += _linears(child, f"{prefix}.{name}")
    return found


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """(name, ModuleList) of the decoder layer stacks: lists whose items have an mlp-like child."""
    stacks = []
    for name, module in model.named_modules():
        if set(clean_name(name).split(".")) & set(ENCODER_ROOTS):
            continue  # a modality encoder's own layers
        if isinstance(module, nn.ModuleList) and len(module) and ".base_layer" not in name:
            first = _children(module[0])
            if any(f in first for f in FFN_NAMES) and any(a in first for a in ATTENTION_NAMES):
                stacks.append((clean_name(name), module))
    return stacks


def clean_name(name: str) -> str:
    """A module name without PEFT's prefixes and wrapper levels."""
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name.replace(".base_layer", "").replace(".original_module", "")


def find_targets(model: nn.Module) -> list[Target]:
    """Every adaptable module / parameter of the decoder layers, with its group and layer index."""
    targets: list[Target] = []
    for stack_name, stack in decoder_layers(model):
        for index, layer in enumerate(stack):
            prefix = f"{stack_name}.{index}"
            kids = _children(layer)
            for attn_name in ATTENTION_NAMES:
                if attn_name in kids:
                    for name, lin in _linears(kids[attn_name], f"{prefix}.{attn_name}"):
                        targets.append(Target(name, "attention", index, "module", lin.weight.numel()))
                    break
            for ffn_name in FFN_NAMES:
                if ffn_name in kids:
                    targets += _ffn_targets(kids[ffn_name], f"{prefix}.{ffn_name}", index)
                    break
    return targets + _multimodal_targets(model)


def _multimodal_targets(model: nn.Module) -> list[Target]:
    """Encoder Linear / Conv2d layers (LoRA) and the fusion modules (trained whole)."""
    found = []
    for name, module in model.named_modules():
        clean = clean_name(name)
        parts = clean.split(".")
        if (
            "lora_" in clean
            or "modules_to_save" in parts
            or ".base_layer" in name
            or ".original_module" in name
        ):
            continue  # PEFT's own sub-modules: the wrapper itself is listed
        if parts[-1] in ENCODER_ROOTS and isinstance(module, nn.ModuleDict):
            for lname, layer in _encoder_layers(module, clean):
                found.append(Target(lname, "encoders", -1, "module", layer.weight.numel()))
        elif parts[-1] in PROJECTOR_NAMES and not (set(parts[:-1]) & set(ENCODER_ROOTS)):
            # PEFT wraps called modules: the items of a ModuleDict, not the dict itself
            items = module.items() if isinstance(module, nn.ModuleDict) else [(None, module)]
            for key, item in items:
                numel = sum(p.numel() for p in item.parameters())
                if numel:
                    found.append(
                        Target(clean if key is None else f"{clean}.{key}", "projector", -1, "full", numel)
                    )
    return found


def _encoder_layers(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    found = []
    for name, child in _unwrap(module).named_modules():
        child = _unwrap(child)
        if isinstance(child, (nn.Linear, nn.Conv2d)) and "lora_" not in name and "base_layer" not in name:
            found.append((f"{prefix}.{name}", child))
    return found


def _ffn_targets(ffn: nn.Module, prefix: str, index: int) -> list[Target]:
    kids = _children(ffn)
    experts = kids.get("experts")
    if experts is None:  # a dense layer
        return [Target(n, "dense_mlp", index, "module", m.weight.numel()) for n, m in _linears(ffn, prefix)]
    found = []
    fused = fused_expert_weights(experts)
    if fused:
        found += [Target(f"{prefix}.experts.{n}", "experts", index, "parameter", numel) for n, numel in fused]
    else:  # experts as a ModuleList of MLPs
        found += [
            Target(n, "experts", index, "module", m.weight.numel())
            for n, m in _linears(experts, f"{prefix}.experts")
        ]
    for name in ROUTER_NAMES:
        router = kids.get(name)
        if router is None:
            continue
        if isinstance(router, nn.Linear):
            found.append(Target(f"{prefix}.{name}", "router", index, "module", router.weight.numel()))
        elif isinstance(getattr(router, "weight", None), nn.Parameter) and router.weight.ndim == 2:
            found.append(
                Target(f"{prefix}.{name}.weight", "router", index, "parameter", router.weight.numel())
            )
    for name in SHARED_NAMES:
        if name in kids:
            for n, m in _linears(kids[name], f"{prefix}.{name}"):
                found.append(Target(n, "shared_experts", index, "module", m.weight.numel()))
    return found


def shape_of(param: torch.Tensor) -> torch.Size:
    """A parameter's full shape, also when DeepSpeed ZeRO-3 holds only a partition of it (`ds_shape`)."""
    return getattr(param, "ds_shape", None) or param.shape


def fused_expert_weights(experts: nn.Module) -> list[tuple[str, int]]:
    """(name, number of weights) of an experts module's fused 3D weights, float or stored quantized
    (a quantized module lists them in `quantized_shapes` instead of its parameters)."""
    fused = [
        (pname, math.prod(shape_of(p)))
        for pname, p in experts.named_parameters(recurse=False)
        if pname in EXPERT_PARAM_NAMES and len(shape_of(p)) == 3
    ]
    quantized = getattr(experts, "quantized_shapes", None) or {}
    fused += [(n, math.prod(getattr(experts, n).shape)) for n in quantized if n not in dict(fused)]
    return sorted(fused, key=lambda item: EXPERT_PARAM_NAMES.index(item[0]))


def quantized_weight_count(model: nn.Module) -> int:
    """Weights held by quantized expert stacks (absent from `model.parameters()`)."""
    return sum(
        math.prod(getattr(m, n).shape)
        for m in model.modules()
        for n in getattr(m, "quantized_shapes", None) or {}
    )


def layer_of(name: str) -> int | None:
    """The layer index in a module / parameter name ("model.layers.3.mlp..." -> 3): its first number."""
    match = re.search(r"\.(\d+)\.", "." + name)
    return int(match[1]) if match else None


def count_target_groups(model: nn.Module) -> dict[str, int]:
    """Number of adaptable modules / parameters per group.

    Always the five decoder groups (zeros included); `encoders` / `projector` only when present.
    """
    counts = dict.fromkeys(GROUPS, 0)
    for target in find_targets(model):
        counts[target.group] = counts.get(target.group, 0) + 1
    return counts


def parse_layers(layers, num_layers: int | None = None) -> set[int] | None:
    """None, an int, a list of ints, or a "start-end" range (inclusive) -> set of layer indices."""
    if layers is None:
        return None
    if isinstance(layers, int):
        return {layers}
    if isinstance(layers, str):
        match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", layers)
        if match:
            start, end = int(match[1]), int(match[2])
            if end < start:
                raise MoetuneError(
                    f"adapter.layers '{layers}': the range ends before it starts; write start-end"
                )
            return set(range(start, end + 1))
        try:
            return {int(v) for v in layers.split(",") if v.strip()}
        except ValueError:
            raise MoetuneError(
                f"adapter.layers '{layers}' is not a layer range; write e.g. '0-3', '1,4,7' or a list of ints"
            ) from None
    try:
        chosen = {int(v) for v in layers}
    except (TypeError, ValueError):
        raise MoetuneError(f"adapter.layers {layers!r} is not a list of layer indices") from None
    if num_layers is not None and any(v < 0 or v >= num_layers for v in chosen):
        raise MoetuneError(f"adapter.layers {sorted(chosen)}: this model has layers 0-{num_layers - 1}")
    return chosen


@dataclass
class Resolved:
    """What a `targets` list resolved to: exact names for PEFT, and the group of each."""

    modules: dict[str, str]  # module name -> group (LoRA)
    parameters: dict[str, str]  # parameter name -> group (LoRA on the weight)
    full: dict[str, str] = field(default_factory=dict)  # module name -> group (trained whole)

    def names_in(self, group: str) -> list[str]:
        return sorted(n for n, g in {**self.modules, **self.parameters}.items() if g == group)


def _groups_summary(targets: list[Target]) -> str:
    counts = {g: sum(t.group == g for t in targets) for g in ALL_GROUPS}
    present = [f"{g} ({n})" for g, n in counts.items() if n]
    return ", ".join(present) if present else "none (no decoder layers with attention and mlp found)"


def resolve_targets(model: nn.Module, targets, layers=None) -> Resolved:
    """Group names and raw names -> exact module / parameter names; loud errors on no match."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if not targets:
        raise MoetuneError(f"adapter.targets is empty; choose from {', '.join(ALL_GROUPS)} or module names")
    found = find_targets(model)
    num_layers = max((t.layer for t in found), default=-1) + 1
    chosen_layers = parse_layers(layers, num_layers)
    model_name = type(_unwrap(model)).__name__
    resolved = Resolved({}, {})
    for request in targets:
        if request in ALL_GROUPS:
            hits = [t for t in found if t.group == request]
            if chosen_layers is not None:  # layers select decoder layers; encoders / projector stay
                hits = [t for t in hits if t.layer < 0 or t.layer in chosen_layers]
            if not hits:
                where = f" in layers {_fmt_layers(chosen_layers)}" if chosen_layers is not None else ""
                raise MoetuneError(
                    f"adapter.targets: group '{request}' matches nothing{where} in {model_name}; "
                    f"groups in this model: {_groups_summary(found)}"
                )
            for t in hits:
                {"parameter": resolved.parameters, "module": resolved.modules, "full": resolved.full}[t.kind][
                    t.name
                ] = t.group
        else:
            _resolve_raw(model, request, found, chosen_layers, resolved, model_name)
    return resolved


def _fmt_layers(layers: set[int]) -> str:
    return ",".join(str(v) for v in sorted(layers))


def _resolve_raw(model, request, found, chosen_layers, resolved, model_name) -> None:
    """A raw module or parameter name: exact, or a suffix after a dot (PEFT's rule)."""
    by_name = {t.name: t for t in found}

    def matches(name):
        return name == request or name.endswith("." + request)

    def in_layers(name):
        layer = layer_of(name)
        return chosen_layers is None or layer is None or layer in chosen_layers

    hit = False
    for name, module in model.named_modules():
        name = clean_name(name)
        if isinstance(module, nn.Linear) and matches(name) and in_layers(name) and "lora_" not in name:
            group = by_name[name].group if name in by_name else "other"
            resolved.modules[name] = group
            hit = True
    for name, param in model.named_parameters():
        name = clean_name(name)
        if param.ndim in (2, 3) and matches(name) and in_layers(name) and "lora_" not in name:
            owner = name.rpartition(".")[0]
            if param.ndim == 2 and owner in resolved.modules:
                continue  # a Linear's weight: already targeted as a module
            if param.ndim == 2 and isinstance(_unwrap(model.get_submodule(owner)), nn.Linear):
                resolved.modules[owner] = by_name[owner].group if owner in by_name else "other"
            else:
                resolved.parameters[name] = by_name[name].group if name in by_name else "other"
            hit = True
    if not hit:
        raise MoetuneError(
            f"adapter.targets: '{request}' is neither a group ({', '.join(ALL_GROUPS)}) nor a module or "
            f"parameter name in {model_name};{did_you_mean(request, ALL_GROUPS)} groups in this model: "
            f"{_groups_summary(found)}"
        )


def did_you_mean(word: str, choices) -> str:
    """' did you mean 'experts'?' for a near miss among `choices` (difflib), else ''."""
    import difflib

    close = difflib.get_close_matches(word.lower(), list(choices), n=1, cutoff=0.6)
    return f" did you mean '{close[0]}'?" if close else ""


# ----------------------------------------------------------------------------- the report


def _group_of(name: str, groups: dict[str, str]) -> str:
    return groups.get(name, "other")


def _trainable_rows(peft_model: nn.Module) -> dict[str, dict]:
    """Per group: modules / parameters adapted, parameters that can change, and experts with LoRA.

    "Trainable" means parameters that training can change: an ESFT selection leaves the other
    experts' LoRA factors at zero with zero gradients (PEFT still stores them, as dense stacks), so
    they are not counted. `experts` maps each experts module to (experts with LoRA, experts).
    """
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    from adapters.expert_fast_path import expert_lora_mask

    groups = {t.name: t.group for t in find_targets(peft_model)}
    rows = {g: {"modules": 0, "params": 0, "trainable": 0, "experts": {}} for g in (*ALL_GROUPS, "other")}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        clean = clean_name(name)
        active = [a for a in module.active_adapters if a in module.lora_A]
        if not active:
            continue
        adapter = active[0]
        if isinstance(module, ParamWrapper) and module.num_experts > 1:
            key = f"{clean}.{module.parameter_name}"
            row = rows[_group_of(key, groups)]
            row["params"] += 1
            per_expert = sum(
                p.numel() for p in (module.lora_A[adapter].weight, module.lora_B[adapter].weight)
            )
            per_expert //= max(module.num_experts, 1)
            mask = expert_lora_mask(module, adapter)
            chosen = module.num_experts if mask is None else sum(mask)
            row["experts"][key.rpartition(".")[0]] = (chosen, module.num_experts)
            if module.lora_A[adapter].weight.requires_grad:
                row["trainable"] += per_expert * chosen
        else:  # a LoRA module, or a 2D weight adapted as a parameter (counted as its module)
            row = rows[_group_of(clean, groups)]
            if isinstance(module, ParamWrapper) and _group_of(clean, groups) == "other":
                row = rows[_group_of(f"{clean}.{module.parameter_name}", groups)]  # e.g. a router weight
            row["modules"] += 1
            row["trainable"] += sum(
                p.numel()
                for n, p in module.named_parameters()
                if "lora_" in n and adapter in n and p.requires_grad
            )
    # whole modules trained (router: train) are PEFT modules_to_save
    for name, module in peft_model.named_modules():
        if type(module).__name__ == "ModulesToSaveWrapper":
            clean = clean_name(name)
            group = _group_of(clean, groups)
            if group == "other":
                group = _group_of(clean + ".weight", groups)
            rows[group]["modules"] += 1
            rows[group]["trainable"] += sum(p.numel() for p in module.parameters() if p.requires_grad)
    return rows


def count_trainable(peft_model: nn.Module) -> int:
    """Parameters that training can change (ESFT: only the selected experts' LoRA); see `_trainable_rows`.

    The one count moetune reports everywhere: the target report, the training summary, metrics.json
    and `moetune plan`.
    """
    return sum(row["trainable"] for row in _trainable_rows(peft_model).values())


def target_report(peft_model: nn.Module) -> str:
    """Per group: modules / parameters adapted, trainable parameters and their share of the model.

    Expert LoRA counts only the experts that carry LoRA (an ESFT selection zeroes the others):
    "(3/16 experts)" is experts with LoRA over routed experts, summed over the MoE layers.
    """
    rows = _trainable_rows(peft_model)
    adapter_names = set()
    for module in peft_model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "active_adapters"):
            adapter_names.update(a for a in module.active_adapters if a in module.lora_A)
    total = quantized_weight_count(peft_model) + sum(
        p.numel() for n, p in peft_model.named_parameters() if "lora_" not in n and "modules_to_save" not in n
    )
    trainable = sum(r["trainable"] for r in rows.values())
    lines = [f"LoRA targets ({', '.join(sorted(adapter_names)) or 'no active adapter'}):"]
    lines.append(f"  {'group':<15}{'adapted':<34}{'trainable params':>18}{'share':>10}")
    for group, row in rows.items():
        if not (row["modules"] or row["params"]):
            continue
        parts = []
        if row["modules"]:
            parts.append(f"{row['modules']} modules")
        if row["params"]:
            chosen = sum(c for c, _ in row["experts"].values())
            of = sum(n for _, n in row["experts"].values())
            note = f" ({chosen}/{of} experts)" if chosen != of else ""
            parts.append(f"{row['params']} params{note}")
        share = 100.0 * row["trainable"] / max(total, 1)
        lines.append(f"  {group:<15}{', '.join(parts):<34}{row['trainable']:>18,}{share:>9.3f}%")
    lines.append(f"  {'total':<15}{'':<34}{trainable:>18,}{100.0 * trainable / max(total, 1):>9.3f}%")
    lines.append(f"  of {total:,} model parameters")
    if trainable == 0:
        lines.append("  WARNING: nothing is trainable")
    return "\n".join(lines)
