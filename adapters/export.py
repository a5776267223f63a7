"""Re-write an adapter folder in another layout: per-expert LoRA pairs for serving stacks, and back.

PEFT stores the LoRA of a fused experts weight [E, ...] as one lora_A (r*E, in) and one lora_B
(out, r*E) (expert e: rows e*r:(e+1)*r of A, columns e, e+E, ... of B). Serving stacks such as
vLLM expect what a non-fused checkpoint has: one LoRA pair per expert and projection,
`...mlp.experts.{e}.gate_proj / up_proj / down_proj`. A fused `gate_up_proj` ([gate; up] along
its output) becomes a gate_proj and an up_proj pair that share expert e's A (exact: the delta of
gate is B_gate A, of up is B_up A). Experts whose LoRA is all zero (outside an ESFT selection) are
not written, so such an export is as small as the selection.

`fmt="per-expert"` writes that layout plus `moetune_export.json` (expert counts and splits);
`fmt="peft"` turns such a folder back into PEFT's fused layout (the round trip is exact).
Attention and other module LoRA weights are copied unchanged.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from adapters.errors import MoetuneError

FORMATS = ("per-expert", "peft")
META_FILE = "moetune_export.json"
_FUSED_KEY = re.compile(r"^(?P<prefix>.*\.experts)\.(?:base_layer\.)*lora_(?P<ab>[AB])\.weight$")


def export_adapter(adapter_dir, output, fmt: str = "per-expert") -> str:
    """Write `adapter_dir` to `output` in layout `fmt`; returns a one-line summary for the CLI."""
    source, output = Path(adapter_dir), Path(output)
    if fmt not in FORMATS:
        raise MoetuneError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    config_file = source / "adapter_config.json"
    weights_file = source / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise MoetuneError(
            f"{source}: not an adapter folder (needs adapter_config.json and adapter_model.safetensors)"
        )
    if output.resolve() == source.resolve():
        raise MoetuneError(f"--output {output} is the adapter folder itself; choose a new folder")
    config = json.loads(config_file.read_text())
    weights = load_file(str(weights_file))
    if fmt == "per-expert":
        new_config, new_weights, meta, summary = _to_per_expert(config, weights, source)
    else:
        new_config, new_weights, meta, summary = _to_fused(config, weights, source)
    _write(source, output, new_config, new_weights, meta)
    return f"wrote {output} ({fmt}): {summary}"


def _write(source: Path, output: Path, config: dict, weights: dict, meta: dict | None) -> None:
    """Write to a temporary folder and rename, so a failed export leaves nothing half-written."""
    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "adapter_model.safetensors"))
    if meta is not None:
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    for extra in ("README.md",):
        if (source / extra).is_file():
            shutil.copy(source / extra, tmp / extra)
    if output.exists():
        if not (output / "adapter_config.json").is_file() and any(output.iterdir()):
            shutil.rmtree(tmp)
            raise MoetuneError(f"--output {output} exists and is not an adapter folder; choose a new folder")
        shutil.rmtree(output)
    tmp.rename(output)


def _to_per_expert(config: dict, weights: dict, source: Path):
    if not _expert_params(config):
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
    wrappers = _wrapper_keys(config, weights, source)
    for param, (key_a, key_b) in wrappers.items():
        weight_a, weight_b = out.pop(key_a), out.pop(key_b)
        prefix, _, pname = param.rpartition(".")  # "model.layers.3.mlp.experts", "gate_up_proj"
        rank = _rank_for(config, param)
        num_experts = weight_a.shape[0] // rank
        lora_a = weight_a.view(num_experts, rank, -1)  # (E, r, in)
        lora_b = weight_b.view(weight_b.shape[0], rank, num_experts).permute(2, 0, 1)  # (E, out, r)
        if pname == "gate_up_proj":
            half = lora_b.shape[1] // 2
            parts = {"gate_proj": slice(0, half), "up_proj": slice(half, None)}
        else:
            parts = {pname: slice(None)}
        kept = [e for e in range(num_experts) if bool(lora_a[e].ne(0).any() or lora_b[e].ne(0).any())]
        skipped += num_experts - len(kept)
        for e in kept:
            for proj, rows in parts.items():
                base = f"base_model.model.{prefix}.{e}.{proj}"
                out[f"{base}.lora_A.weight"] = lora_a[e].clone()
                out[f"{base}.lora_B.weight"] = lora_b[e, rows].clone()
                written += 1
        modules.update(f"{prefix}.{e}.{proj}" for e in kept for proj in parts)
        for pattern in (rank_pattern, alpha_pattern):
            if re.escape(param) in pattern:
                value = pattern.pop(re.escape(param))
                pattern[re.escape(prefix) + r"\.\d+\.(" + "|".join(parts) + ")"] = value
        meta["params"][param] = {"num_experts": num_experts, "rank": rank, "parts": list(parts), "kept": kept}
    others = sorted(set(config.get("target_parameters") or []) - set(wrappers))  # e.g. a router weight
    new_config = dict(config)
    new_config.update(
        target_parameters=others or None,
        target_modules=sorted(modules),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    summary = f"{written} per-expert LoRA pairs from {len(wrappers)} fused weights"
    if skipped:
        summary += f", {skipped} (weight, expert) pairs without LoRA left out"
    return new_config, out, meta, summary


def _rank_for(config: dict, param: str) -> int:
    for pattern, rank in (config.get("rank_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", param):
            return int(rank)
    return int(config["r"])


def _wrapper_keys(config: dict, weights: dict, source: Path) -> dict[str, tuple[str, str]]:
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
    result = dict.fromkeys(_expert_params(config))
    for prefix, entries in by_module.items():
        module = prefix.removeprefix("base_model.model.")
        names = sorted(p for p in result if p.rpartition(".")[0] == module)
        # PEFT wraps parameters in named_parameters order; the first wrapped ends up deepest.
        order = _nesting_order(names)
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


def _expert_params(config: dict) -> list[str]:
    """The fused expert weights among target_parameters (a 2D router / Linear weight stays as it is)."""
    return [p for p in config.get("target_parameters") or [] if p.rpartition(".")[0].endswith(".experts")]


def _nesting_order(names: list[str]) -> list[str]:
    """Fused experts register the up projection before down_proj; PEFT wraps in that order."""
    return sorted(names, key=lambda n: 0 if not n.endswith("down_proj") else 1)


def _to_fused(config: dict, weights: dict, source: Path):
    meta_file = source / META_FILE
    if not meta_file.is_file():
        raise MoetuneError(
            f"{source}: no {META_FILE}; only folders written by --format per-expert convert back"
        )
    meta = json.loads(meta_file.read_text())
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
        for depth, param in enumerate(reversed(_nesting_order(params))):
            info = meta["params"][param]
            num_experts, rank, parts = info["num_experts"], info["rank"], info["parts"]
            in_key = f"base_model.model.{module}.{info['kept'][0]}.{parts[0]}.lora_A.weight"
            in_features = out[in_key].shape[-1] if info["kept"] else 0
            b_parts = [out[f"base_model.model.{module}.{info['kept'][0]}.{p}.lora_B.weight"] for p in parts]
            out_features = sum(b.shape[0] for b in b_parts)
            lora_a = torch.zeros(num_experts, rank, in_features, dtype=b_parts[0].dtype)
            lora_b = torch.zeros(num_experts, out_features, rank, dtype=b_parts[0].dtype)
            for e in info["kept"]:
                base = f"base_model.model.{module}.{e}"
                lora_a[e] = out.pop(f"{base}.{parts[0]}.lora_A.weight")
                lora_b[e] = torch.cat([out[f"{base}.{p}.lora_B.weight"] for p in parts])
                for p in parts[1:]:
                    out.pop(f"{base}.{p}.lora_A.weight")
                for p in parts:
                    out.pop(f"{base}.{p}.lora_B.weight")
                modules.difference_update(f"{module}.{e}.{p}" for p in parts)
            nest = ".base_layer" * depth
            out[f"base_model.model.{module}{nest}.lora_A.weight"] = lora_a.reshape(
                num_experts * rank, in_features
            )
            out[f"base_model.model.{module}{nest}.lora_B.weight"] = lora_b.permute(1, 2, 0).reshape(
                out_features, rank * num_experts
            )  # (out, r, E) -> (out, r*E)
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
    return new_config, out, None, f"{len(meta['params'])} fused expert weights rebuilt"
