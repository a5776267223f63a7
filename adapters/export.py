"""Re-write an adapter folder in another layout: compact per-expert storage, serving layouts, and back.

PEFT stores the LoRA of a fused experts weight [E, ...] as one lora_A (r*E, in) and one lora_B
(out, r*E) (expert e: rows e*r:(e+1)*r of A, columns e, e+E, ... of B). Formats:
- `per-expert` (storage): one LoRA pair per expert and projection,
  `...mlp.experts.{e}.gate_proj / up_proj / down_proj`; a fused `gate_up_proj` ([gate; up] along its
  output) becomes a gate_proj and an up_proj pair that share expert e's A. Experts whose LoRA is all
  zero (outside an ESFT selection) are not written, so the folder is as small as the selection;
  `moetune_export.json` records the expert counts and splits. Serving stacks reject it (they need
  every expert); it is for storage and converts back with `peft`.
- `peft`: such a per-expert folder back into PEFT's fused layout (the round trip is exact).
- `vllm` / `sglang`: what that server loads for the base model's family (adapters/serving_layouts.py):
  every expert present with gate, up and down, one rank, gate/up split by the family's convention,
  or PEFT's fused layout where the server's model class expects it. `verify=True` then checks the
  export numerically with an independent reader (adapters/serving_verify.py).
Attention and other module LoRA weights are copied unchanged (serving formats: rank-padded, scaling folded).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from adapters.errors import MoetuneError
from adapters.output_folder import atomic_output_folder
from adapters.peft_format import (
    SAVED_PREFIX,
    expert_params,
    group_factors,
    module_name,
    pack_experts,
    read_adapter,
    read_factors,
    resolve_pairs,
    wrapper_keys,
)
from adapters.serving_layouts import TARGETS, ServingExport, serving_export

if TYPE_CHECKING:
    from adapters.serving_verify import ExportCheck

FORMATS = ("per-expert", "peft", *TARGETS)
META_FILE = "moetune_export.json"


@dataclass
class PerExpertExport:
    """`--format per-expert`: what was split."""

    pairs: int  # per-expert LoRA pairs written
    fused_weights: int  # fused expert weights they came from
    left_out: int  # (weight, expert) pairs without LoRA, not written

    def __str__(self) -> str:
        text = f"{self.pairs} per-expert LoRA pairs from {self.fused_weights} fused weights"
        if self.left_out:
            text += f", {self.left_out} (weight, expert) pairs without LoRA left out"
        return text


@dataclass
class PeftExport:
    """`--format peft`: what was rebuilt."""

    fused_weights: int

    def __str__(self) -> str:
        return f"{self.fused_weights} fused expert weights rebuilt"


@dataclass
class ExportReport:
    """What `export_adapter` wrote; `str()` is what `moetune export-adapter` prints."""

    output: Path
    fmt: str
    details: PerExpertExport | PeftExport | ServingExport
    check: ExportCheck | None = None  # verify=True: the verify-export comparison

    def __str__(self) -> str:
        text = f"wrote {self.output} ({self.fmt}): {self.details}"
        return text if self.check is None else f"{text}\n{self.check}"


def export_adapter(
    adapter_dir,
    output,
    fmt: str = "per-expert",
    *,
    base=None,
    rank: int | None = None,
    verify: bool = False,
) -> ExportReport:
    """Write `adapter_dir` to `output` in layout `fmt`; returns what was written.

    base: the base model folder; for `vllm` / `sglang` its config.json decides the layout (default:
        the adapter's base_model_name_or_path when that is a local folder). Needed for `verify`.
    rank: `vllm` / `sglang`: the one rank of the export (default: the largest in the adapter).
    verify: `vllm` / `sglang`: compare the export's logits with base + adapter right away.
    """
    source, output = Path(adapter_dir), Path(output)
    if fmt not in FORMATS:
        raise MoetuneError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt not in TARGETS and (rank is not None or verify):
        raise MoetuneError(f"--rank and --verify apply to --format {' / '.join(TARGETS)}, not {fmt}")
    if verify and base is None:
        raise MoetuneError("--verify needs --base MODEL (the model the adapter was trained on)")
    config, weights = read_adapter(source, plain_lora=False)
    if output.resolve() == source.resolve():
        raise MoetuneError(f"--output {output} is the adapter folder itself; choose a new folder")
    if fmt in TARGETS:
        base = _base_folder(base, config, source, fmt)
        factors = read_factors(source)
        new_config, new_weights, meta, details = serving_export(
            factors, _base_config(base), fmt, rank, base_name=str(base)
        )
    elif fmt == "per-expert":
        new_config, new_weights, meta, details = _to_per_expert(config, weights, source)
    else:
        new_config, new_weights, meta, details = _to_fused(config, weights, source)
    _write(source, output, new_config, new_weights, meta)
    report = ExportReport(output, fmt, details)
    if verify:
        from adapters.serving_verify import verify_export

        report.check = verify_export(output, base, source)
    return report


def _base_folder(base, config: dict, source: Path, fmt: str) -> Path:
    """The base model folder: --base, else the adapter's base_model_name_or_path if it is on disk."""
    if base is None:
        recorded = config.get("base_model_name_or_path")
        if recorded and (Path(recorded) / "config.json").is_file():
            return Path(recorded)
        raise MoetuneError(
            f"--format {fmt} needs the base model's config.json (its model_type decides the layout); "
            f"{source} names base {recorded!r}, not a local folder: pass --base MODEL"
        )
    return Path(base)


def _base_config(base: Path) -> dict:
    config_file = base / "config.json"
    if not config_file.is_file():
        raise MoetuneError(
            f"{base}: no config.json; --base must be the model folder the adapter was trained on"
        )
    return json.loads(config_file.read_text())


def _write(source: Path, output: Path, config: dict, weights: dict, meta: dict | None) -> None:
    """Write the folder atomically (adapters.output_folder): a failed export leaves nothing half-written.

    An earlier adapter folder at `output` is replaced; any other non-empty folder is refused."""
    if output.exists() and any(output.iterdir()) and not (output / "adapter_config.json").is_file():
        raise MoetuneError(f"--output {output} exists and is not an adapter folder; choose a new folder")
    with atomic_output_folder(output, replace=True) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "adapter_model.safetensors"))
        if meta is not None:
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for extra in ("README.md",):
            if (source / extra).is_file():
                shutil.copy(source / extra, tmp / extra)


def _to_per_expert(config: dict, weights: dict, source: Path):
    if not expert_params(config):
        raise MoetuneError(
            f"{source}: this adapter has no expert (target_parameters) LoRA; nothing to export"
        )
    out = dict(weights)
    meta = {"format": "per-expert", "params": {}}
    modules: set[str] = set(config.get("target_modules") or [])
    rank_pattern, alpha_pattern = (
        dict(config.get("rank_pattern") or {}),
        dict(config.get("alpha_pattern") or {}),
    )
    written = skipped = 0
    experts = {p.rpartition(".")[0] for p in expert_params(config)}
    fused = {  # the experts modules' LoRA; every other weight is copied unchanged
        k: v for k, v in weights.items() if ".lora_" in k and module_name(k) in experts
    }
    pairs = resolve_pairs(config, group_factors(fused, str(source)), str(source))
    wrappers = [p for p in pairs.values() if p.param in expert_params(config)]
    for pair in wrappers:
        param = pair.param
        del out[f"{pair.key}.lora_A.weight"], out[f"{pair.key}.lora_B.weight"]
        prefix, _, pname = param.rpartition(".")  # "model.layers.3.mlp.experts", "gate_up_proj"
        lora_a, lora_b = pair.split()  # (E, r, in), (E, out, r)
        if pname == "gate_up_proj":
            half = lora_b.shape[1] // 2
            parts = {"gate_proj": slice(0, half), "up_proj": slice(half, None)}
        else:
            parts = {pname: slice(None)}
        kept = [e for e in range(pair.num_experts) if bool(lora_a[e].ne(0).any() or lora_b[e].ne(0).any())]
        skipped += pair.num_experts - len(kept)
        for e in kept:
            for proj, rows in parts.items():
                base = f"{SAVED_PREFIX}{prefix}.{e}.{proj}"
                out[f"{base}.lora_A.weight"] = lora_a[e].clone()
                out[f"{base}.lora_B.weight"] = lora_b[e, rows].clone()
                written += 1
        modules.update(f"{prefix}.{e}.{proj}" for e in kept for proj in parts)
        for pattern in (rank_pattern, alpha_pattern):
            if re.escape(param) in pattern:
                value = pattern.pop(re.escape(param))
                pattern[re.escape(prefix) + r"\.\d+\.(" + "|".join(parts) + ")"] = value
        meta["params"][param] = {
            "num_experts": pair.num_experts,
            "rank": pair.rank,
            "parts": list(parts),
            "kept": kept,
        }
    others = sorted(set(config.get("target_parameters") or []) - set(meta["params"]))  # e.g. a router weight
    new_config = dict(config)
    new_config.update(
        target_parameters=others or None,
        target_modules=sorted(modules),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    return new_config, out, meta, PerExpertExport(written, len(wrappers), skipped)


def _to_fused(config: dict, weights: dict, source: Path):
    meta_file = source / META_FILE
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if meta.get("format") != "per-expert":
        raise MoetuneError(
            f"{source}: only folders written by --format per-expert convert back "
            f"({META_FILE}: format {meta.get('format')!r})"
        )
    out = dict(weights)
    modules = set(config.get("target_modules") or [])
    rank_pattern, alpha_pattern = (
        dict(config.get("rank_pattern") or {}),
        dict(config.get("alpha_pattern") or {}),
    )
    by_module: dict[str, list[str]] = {}
    for param in meta["params"]:
        by_module.setdefault(param.rpartition(".")[0], []).append(param)
    for module, params in by_module.items():
        keys = wrapper_keys(module, params)
        for param in params:
            info = meta["params"][param]
            num_experts, rank, parts = info["num_experts"], info["rank"], info["parts"]
            expert = f"{SAVED_PREFIX}{module}.{info['kept'][0]}" if info["kept"] else None
            in_features = out[f"{expert}.{parts[0]}.lora_A.weight"].shape[-1] if expert else 0
            b_parts = [out[f"{expert}.{p}.lora_B.weight"] for p in parts]
            out_features = sum(b.shape[0] for b in b_parts)
            lora_a = torch.zeros(num_experts, rank, in_features, dtype=b_parts[0].dtype)
            lora_b = torch.zeros(num_experts, out_features, rank, dtype=b_parts[0].dtype)
            for e in info["kept"]:
                base = f"{SAVED_PREFIX}{module}.{e}"
                lora_a[e] = out.pop(f"{base}.{parts[0]}.lora_A.weight")
                lora_b[e] = torch.cat([out[f"{base}.{p}.lora_B.weight"] for p in parts])
                for p in parts[1:]:
                    out.pop(f"{base}.{p}.lora_A.weight")
                for p in parts:
                    out.pop(f"{base}.{p}.lora_B.weight")
                modules.difference_update(f"{module}.{e}.{p}" for p in parts)
            packed_a, packed_b = pack_experts(lora_a, lora_b)
            out[f"{keys[param]}.lora_A.weight"], out[f"{keys[param]}.lora_B.weight"] = packed_a, packed_b
            for pattern in (rank_pattern, alpha_pattern):
                key = re.escape(module) + r"\.\d+\.(" + "|".join(parts) + ")"
                if key in pattern:
                    pattern[re.escape(param)] = pattern.pop(key)
    new_config = dict(config)
    new_config.update(
        target_parameters=sorted(set(meta["params"]) | set(config.get("target_parameters") or [])),
        target_modules=sorted(modules),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    return new_config, out, None, PeftExport(len(meta["params"]))
