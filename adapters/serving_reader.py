"""Read a vLLM / SGLang expert-adapter export the way the server does, into dense weight deltas.

Written from the servers' loading code, independently of moetune's writer: it imports nothing from
adapters.export, adapters.serving_layouts or adapters.peft_format (the module every other part of
moetune reads, splits and packs PEFT's factor layout with), and re-derives the stacking itself, on
purpose: a mistake in the shared layout code would otherwise cancel out between writer and reader.
Keep it that way (tests/test_export_serving.py checks its imports). The rules it applies (docs/serving.md cites the files):
- one scaling for the whole adapter: lora_alpha / r (vLLM's PEFTHelper: lora_alpha / sqrt(r) with
  use_rslora; SGLang's LoRAAdapter: lora_alpha / r). Neither reads rank_pattern / alpha_pattern, and
  both size their buffers by r: an export with patterns, or a tensor of another rank, is refused.
- names: PEFT's `base_model.model.` prefix is dropped, `.lora_A.weight` / `.lora_B.weight` pair up.
- vLLM, per-expert classes (FusedMoEWithLoRA; `pack_moe` stacks [w1, w2, w3] of every expert and
  asserts each is there): `<ffn>.experts.{e}.<name>` with the names of the class's expert mapping,
  gate_proj / up_proj / down_proj, or w1 / w3 / w2 for Mixtral, whose vLLM class keeps the experts
  under `block_sparse_moe` (transformers renames that to `mlp`).
- vLLM, classes with is_3d_moe_weight (FusedMoE3DWithLoRA; GPT-OSS): `experts.base_layer` is
  gate_up_proj, `experts` is down_proj; A (r*E, in) -> (E, r, in), B (out, r*E) -> (out, r, E) ->
  (E, out, r) (`_stack_moe_lora_weights`); the B rows are the checkpoint's own w13 rows.
- SGLang (MoE memory pool): `experts.{e}.` + gate_proj / up_proj / down_proj (w1 / w3 / w2 are
  renamed to those); an expert the file lacks is zero-filled.
The gate and up rows of the rebuilt fused weight, and its storage orientation, come from the base
model's own experts module (transformers' `is_concatenated`, `is_transposed` flags), not from the
export's metadata.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from adapters.errors import MoetuneError

META_FILE = "moetune_export.json"
TARGETS = ("vllm", "sglang")
VLLM_3D_MODEL_TYPES = {"gpt_oss"}  # vLLM classes with is_3d_moe_weight = True (GptOssForCausalLM)
VLLM_EXPERT_NAMES = {"mixtral": {"w1": "gate", "w3": "up", "w2": "down"}}  # get_expert_mapping ckpt names
VLLM_FFN_NAMES = {"mixtral": "block_sparse_moe"}  # vLLM module name; transformers calls it "mlp"
HF_EXPERT_NAMES = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
SGLANG_EXPERT_NAMES = {**HF_EXPERT_NAMES, "w1": "gate", "w3": "up", "w2": "down"}

_PER_EXPERT = re.compile(r"^(?P<ffn>.+)\.experts\.(?P<e>\d+)\.(?P<proj>[^.]+)$")
_FUSED = re.compile(r"^(?P<ffn>.+)\.experts(?P<base>\.base_layer)?$")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")

Pair = tuple[torch.Tensor, torch.Tensor]  # (A (r, in), B (out, r)); stacked: (A (E, r, in), B (E, out, r))


@dataclass
class ExportedAdapter:
    """An export as the server holds it, under the transformers model's module names."""

    folder: Path
    target: str
    model_type: str
    rank: int
    scaling: float
    linear: dict[str, Pair] = field(default_factory=dict)  # module -> pair
    experts: dict[str, dict[int, dict[str, Pair]]] = field(
        default_factory=dict
    )  # experts -> e -> gate/up/down
    fused: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)  # raw A, B

    @property
    def layout(self) -> str:
        return "fused" if self.fused else "per-expert"


def read_export(folder: str | Path) -> ExportedAdapter:
    """Parse `folder` (written by `export-adapter --format vllm|sglang`) by the target's rules."""
    folder = Path(folder)
    files = [folder / "adapter_config.json", folder / "adapter_model.safetensors", folder / META_FILE]
    if not all(f.is_file() for f in files):
        raise MoetuneError(
            f"{folder}: not a serving export (needs adapter_config.json, adapter_model.safetensors and "
            f"{META_FILE}); write one with moetune export-adapter --format vllm|sglang"
        )
    config = json.loads(files[0].read_text())
    meta = json.loads(files[2].read_text())
    target, model_type = meta.get("format"), meta.get("model_type")
    if target not in TARGETS:
        raise MoetuneError(
            f"{folder}: verify-export reads vllm / sglang exports; {META_FILE} says format {target!r}"
        )
    for pattern in ("rank_pattern", "alpha_pattern"):
        if config.get(pattern):
            raise MoetuneError(
                f"{folder}/adapter_config.json: {pattern} is set, but {target} reads one r and one "
                "lora_alpha for the whole adapter; re-export with --format " + target
            )
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    if config.get("use_rslora") and target == "sglang":
        raise MoetuneError(
            f"{folder}/adapter_config.json: use_rslora is set, but SGLang scales by lora_alpha / r"
        )
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    result = ExportedAdapter(folder, target, model_type, rank, scaling)
    tensors = load_file(str(files[1]))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise MoetuneError(f"{folder}: {key} is not a LoRA A / B weight; {target} would not load it")
        pairs.setdefault(match["module"], {})[match["ab"]] = tensor
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise MoetuneError(f"{folder}: {module} has lora_{''.join(pair)} only; the pair is incomplete")
        _place(result, module, pair["A"], pair["B"])
    return result


def _place(result: ExportedAdapter, module: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """File one pair where the target's loader puts it (see the module docstring)."""
    folder, target, rank = result.folder, result.target, result.rank
    fused = _FUSED.match(module)
    per_expert = _PER_EXPERT.match(module)
    vllm_3d = target == "vllm" and result.model_type in VLLM_3D_MODEL_TYPES
    if fused:
        if not vllm_3d:
            raise MoetuneError(
                f"{folder}: {module} holds fused (3D) expert LoRA, which {target} does not load for "
                f"{result.model_type} (it reads one pair per expert); re-export with --format {target}"
            )
        if a.shape[0] % rank or b.shape[1] != a.shape[0]:
            raise MoetuneError(
                f"{folder}: rank mismatch at {module}: A {tuple(a.shape)}, B {tuple(b.shape)} are not "
                f"r={rank} x experts; vLLM reshapes them by r"
            )
        part = "gate_up" if fused["base"] else "down"
        result.fused.setdefault(f"{fused['ffn']}.experts", {})[part] = (a, b)
        return
    _check_rank(folder, module, a, b, rank)
    if per_expert:
        if vllm_3d:
            raise MoetuneError(
                f"{folder}: {module} is a per-expert pair, but vLLM loads {result.model_type} experts "
                "fused (is_3d_moe_weight); re-export with --format vllm"
            )
        names = SGLANG_EXPERT_NAMES
        ffn = per_expert["ffn"]
        if target == "vllm":
            names = VLLM_EXPERT_NAMES.get(result.model_type, HF_EXPERT_NAMES)
            vllm_ffn = VLLM_FFN_NAMES.get(result.model_type, "mlp")
            parent, _, leaf = ffn.rpartition(".")
            if leaf != vllm_ffn:
                raise MoetuneError(
                    f"{folder}: {module}: vLLM's {result.model_type} class keeps its experts under "
                    f"'{vllm_ffn}', so it would not find this pair; re-export with --format vllm"
                )
            ffn = f"{parent}.mlp"
        role = names.get(per_expert["proj"])
        if role is None:
            raise MoetuneError(
                f"{folder}: {module}: {target} names {result.model_type} expert weights "
                f"{' / '.join(names)}, not {per_expert['proj']!r}; re-export with --format {target}"
            )
        experts = result.experts.setdefault(f"{ffn}.experts", {})
        experts.setdefault(int(per_expert["e"]), {})[role] = (a, b)
        return
    result.linear[module] = (a, b)


def _check_rank(folder: Path, module: str, a: torch.Tensor, b: torch.Tensor, rank: int) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
        raise MoetuneError(
            f"{folder}: rank mismatch at {module}: A {tuple(a.shape)}, B {tuple(b.shape)}, but "
            f"adapter_config.json says r={rank}; the server sizes every pair by r"
        )


def export_deltas(export: ExportedAdapter, model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameter name -> the weight delta the server applies, in that parameter's storage layout.

    Checks that the export fits `model` (its model_type, modules, expert counts and widths) and, for
    vLLM, that every expert of a layer carries gate, up and down (`pack_moe`).
    """
    model_type = getattr(model.config, "model_type", None)
    if export.model_type != model_type:
        raise MoetuneError(
            f"{export.folder} was exported for model_type {export.model_type!r}, the base is "
            f"{model_type!r}: an export from another base; re-export with --base MODEL"
        )
    deltas: dict[str, torch.Tensor] = {}
    for module, (a, b) in export.linear.items():
        weight = _parameter(export, model, f"{module}.weight")
        delta = export.scaling * (b.float() @ a.float())
        deltas[f"{module}.weight"] = _fits(export, f"{module}.weight", weight, delta)
    for prefix, experts in export.experts.items():
        deltas.update(_per_expert_deltas(export, model, prefix, experts))
    for prefix, parts in export.fused.items():
        deltas.update(_fused_deltas(export, model, prefix, parts))
    return deltas


def _per_expert_deltas(export, model, prefix: str, experts: dict[int, dict[str, Pair]]):
    module = _experts_module(export, model, prefix)
    gate_up = _parameter(export, model, f"{prefix}.gate_up_proj")
    down = _parameter(export, model, f"{prefix}.down_proj")
    num_experts = gate_up.shape[0]
    if max(experts) >= num_experts:
        raise MoetuneError(
            f"{export.folder}: {prefix} has expert {max(experts)}, the base has {num_experts} experts: "
            "an export from another base; re-export with --base MODEL"
        )

    def delta(e: int, role: str) -> torch.Tensor | None:
        pair = experts.get(e, {}).get(role)
        if pair is None:
            if export.target == "vllm":
                raise MoetuneError(
                    f"{export.folder}: {prefix} expert {e} has no {role} LoRA; vLLM's pack_moe needs "
                    "gate, up and down for every expert of a layer; re-export with --format vllm"
                )
            return None  # SGLang zero-fills an expert the file lacks
        return export.scaling * (pair[1].float() @ pair[0].float())  # (out, in)

    gate_up_rows, down_rows = [], []
    for e in range(num_experts):
        gate, up = delta(e, "gate"), delta(e, "up")
        if gate is None and up is None:
            gate_up_rows.append(None)
        else:  # SGLang loads a lone gate or up with zeros for the other half
            gate = torch.zeros_like(up) if gate is None else gate
            up = torch.zeros_like(gate) if up is None else up
            gate_up_rows.append(_fuse_gate_up(module, gate, up))
        down_rows.append(delta(e, "down"))
    return {
        f"{prefix}.gate_up_proj": _stack(export, module, f"{prefix}.gate_up_proj", gate_up, gate_up_rows),
        f"{prefix}.down_proj": _stack(export, module, f"{prefix}.down_proj", down, down_rows),
    }


def _fuse_gate_up(module: nn.Module, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Gate (I, H) and up (I, H) deltas -> the fused (2I, H) delta in the base's own row order."""
    if getattr(module, "is_concatenated", True):
        return torch.cat([gate, up])  # [gate; up]
    return torch.stack([gate, up], dim=1).reshape(-1, gate.shape[-1])  # gate0, up0, gate1, up1, ...


def _stack(export, module, name: str, weight: torch.Tensor, rows: list[torch.Tensor | None]) -> torch.Tensor:
    """Per-expert (out, in) deltas (None: zero) -> the parameter's [E, out, in] or [E, in, out] delta."""
    transposed = getattr(module, "is_transposed", False)
    shape = weight.shape[1:] if not transposed else weight.shape[1:][::-1]  # (out, in)
    zero = torch.zeros(shape)
    stacked = torch.stack([zero if r is None else r for r in rows])
    if stacked.shape[1:] != shape:
        raise MoetuneError(
            f"{export.folder}: {name} experts are {tuple(stacked.shape[1:])} (out, in) in the export, "
            f"{tuple(shape)} in the base: an export from another base; re-export with --base MODEL"
        )
    return stacked.transpose(1, 2) if transposed else stacked


def _fused_deltas(export, model, prefix: str, parts: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    module = _experts_module(export, model, prefix)
    result = {}
    for part, pname in (("gate_up", "gate_up_proj"), ("down", "down_proj")):
        if part not in parts:
            raise MoetuneError(
                f"{export.folder}: {prefix} has no {pname} LoRA; vLLM's 3D MoE loader needs both "
                "experts.base_layer (gate_up_proj) and experts (down_proj)"
            )
        weight = _parameter(export, model, f"{prefix}.{pname}")
        num_experts = weight.shape[0]
        a, b = parts[part]
        if a.shape[0] != export.rank * num_experts:
            raise MoetuneError(
                f"{export.folder}: {prefix} {pname} holds {a.shape[0] // export.rank} experts, the base "
                f"has {num_experts}: an export from another base; re-export with --base MODEL"
            )
        stack_a = a.float().reshape(num_experts, export.rank, a.shape[-1])  # (E, r, in)
        stack_b = b.float().reshape(b.shape[0], export.rank, num_experts).permute(2, 0, 1)  # (E, out, r)
        rows = list(export.scaling * torch.bmm(stack_b, stack_a))  # E x (out, in)
        result[f"{prefix}.{pname}"] = _stack(export, module, f"{prefix}.{pname}", weight, rows)
    return result


def _experts_module(export: ExportedAdapter, model: nn.Module, prefix: str) -> nn.Module:
    try:
        return model.get_submodule(prefix)
    except AttributeError:
        raise MoetuneError(
            f"{export.folder}: the base has no module {prefix}: an export from another base; "
            "re-export with --base MODEL"
        ) from None


def _parameter(export: ExportedAdapter, model: nn.Module, name: str) -> torch.Tensor:
    try:
        return model.get_parameter(name)
    except AttributeError:
        raise MoetuneError(
            f"{export.folder}: the base has no weight {name}: an export from another base; "
            "re-export with --base MODEL"
        ) from None


def _fits(export: ExportedAdapter, name: str, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    if weight.shape != delta.shape:
        raise MoetuneError(
            f"{export.folder}: {name} is {tuple(weight.shape)} in the base, its LoRA delta "
            f"{tuple(delta.shape)}: an export from another base; re-export with --base MODEL"
        )
    return delta
