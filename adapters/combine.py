"""Combine LoRA adapters trained on the same base into one adapter, routed experts included.

PEFT's `add_weighted_adapter` refuses adapters that use `target_parameters` (the fused expert
tensors), so moetune does the expert-aware part itself and calls `peft.utils.merge_utils` for the
per-tensor maths (TIES trimming + sign election, DARE dropping).

How the LoRA factors are combined, per module (for a fused expert tensor: per expert):

  method        result                                                      exact?
  linear        concatenate the factors along the rank:                      yes: sum_i w_i * delta_i
                A = [sqrt|c_i| A_i], B = [sign(c_i) sqrt|c_i| B_i], c_i = w_i * scaling_i
  svd           the same weighted sum, re-factorised to rank max(r_i) by a   best rank-r approximation
                truncated SVD (computed from the factors: QR + a small SVD)
  ties          PEFT `ties` on the full deltas s_i B_i A_i, then SVD to rank max(r_i)
  dare_linear   PEFT `dare_linear` on the full deltas, then SVD            (random: `seed`)
  dare_ties     PEFT `dare_ties` on the full deltas, then SVD              (random: `seed`)

The output always has scaling 1 (lora_alpha == r), one rank for every module (smaller modules are
zero-padded, which changes nothing), and the exact PEFT file layout, so `PeftModel.from_pretrained`
loads it. Weights default to 1 for every adapter: the result acts like all adapters applied at once;
pass e.g. 0.5,0.5 for an average.

The PEFT layout of an expert tensor with E experts and rank r (see peft `ParamWrapper`):
lora_A is (r*E, in) with rows ordered expert-major (row = e*r + k); lora_B is (out, r*E) with
columns ordered rank-major (col = k*E + e); `adapters.peft_format` reads, splits and packs them.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.errors import MoetuneError
from adapters.output_folder import atomic_output_folder, check_new_output
from adapters.peft_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    SAVED_PREFIX,
    LoraPair,
    load_pairs,
    pack_experts,
)

METHODS = ("linear", "ties", "dare_linear", "dare_ties", "svd")


# ----------------------------------------------------------------------------- combining


def dare_seed(seed: int, module: str, expert: int) -> int:
    """The RNG seed DARE uses for one expert of one module: results do not depend on processing order."""
    return (seed * 1_000_003 + zlib.crc32(f"{module}#{expert}".encode())) % (2**63)


def _truncate_dense(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors of (E, out, in) deltas: (A3 (E, rank, in), B3 (E, out, rank)).

    The SVD of full deltas is the costly step of ties / dare, so it runs on the GPU when there is one.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    u, s, vh = torch.linalg.svd(delta.to(device), full_matrices=False)
    rank = min(rank, s.shape[-1])
    return vh[:, :rank, :].cpu(), (u[:, :, :rank] * s[:, None, :rank]).cpu()


def _truncate_factors(a3: torch.Tensor, b3: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors of B3 @ A3 without forming it: QR of both factors, SVD of the small core."""
    qb, rb = torch.linalg.qr(b3)  # (E, out, k1), (E, k1, R)
    qa, ra = torch.linalg.qr(a3.transpose(1, 2))  # (E, in, k2), (E, k2, R)
    u, s, vh = torch.linalg.svd(rb @ ra.transpose(1, 2), full_matrices=False)  # core (E, k1, k2)
    rank = min(rank, s.shape[-1])
    return vh[:, :rank, :] @ qa.transpose(1, 2), qb @ (u[:, :, :rank] * s[:, None, :rank])


def _concatenate(parts: list[LoraPair], weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-concatenated factors whose product is exactly sum_i w_i * delta_i: (E, R, in), (E, out, R)."""
    a_parts, b_parts = [], []
    for factors, weight in zip(parts, weights):
        a3, b3 = factors.split(torch.float32)
        c = weight * factors.scaling
        a_parts.append(math.sqrt(abs(c)) * a3)
        b_parts.append(math.copysign(math.sqrt(abs(c)), c) * b3)
    return torch.cat(a_parts, dim=1), torch.cat(b_parts, dim=2)


def _prune_merge(parts: list[LoraPair], weights, method: str, density: float, seed: int, rank: int):
    """TIES / DARE (peft.utils.merge_utils) on the full deltas, then SVD: expert by expert, so one expert's
    (out, in) deltas are all that is ever formed. Returns (A3 (E, rank, in), B3 (E, out, rank))."""
    from peft.utils import merge_utils

    fn = {
        "ties": merge_utils.ties,
        "dare_linear": merge_utils.dare_linear,
        "dare_ties": merge_utils.dare_ties,
    }[method]
    factors = [p.split(torch.float32) for p in parts]
    w = torch.tensor(weights, dtype=torch.float32)
    a_out, b_out = [], []
    for e in range(parts[0].num_experts):
        deltas = [p.scaling * (b3[e] @ a3[e]) for p, (a3, b3) in zip(parts, factors)]  # each (out, in)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(dare_seed(seed, parts[0].key, e))
            merged = fn(deltas, w, density)
        a, b = _truncate_dense(merged[None], rank)
        a_out.append(a[0])
        b_out.append(b[0])
    return torch.stack(a_out), torch.stack(b_out)


def combine_factors(parts: list[LoraPair], weights, method: str, density: float, seed: int):
    """Combined factors of one module: (A3 (E, r, in), B3 (E, out, r)), scaling 1."""
    rank = max(p.rank for p in parts)
    if method == "linear":
        return _concatenate(parts, weights)
    if method == "svd":
        return _truncate_factors(*_concatenate(parts, weights), rank)
    return _prune_merge(parts, weights, method, density, seed, rank)


def _same_base(configs: list[dict], dirs: list[Path]) -> None:
    def norm(name):
        if name and Path(name).is_dir():
            return str(Path(name).resolve())
        return name

    named = [(norm(c.get("base_model_name_or_path")), d) for c, d in zip(configs, dirs)]
    named = [(n, d) for n, d in named if n]
    for name, folder in named[1:]:
        if name != named[0][0]:
            raise MoetuneError(
                f"adapters were trained on different bases: {named[0][1]} on '{named[0][0]}', {folder} on "
                f"'{name}'; combine adapters of one base only"
            )


def _same_targets(configs: list[dict], factor_sets: list[dict[str, LoraPair]], dirs: list[Path]) -> None:
    def targets(config, key):
        value = config.get(key) or []
        return sorted([value] if isinstance(value, str) else value)

    first = factor_sets[0]
    for config, factors, folder in zip(configs[1:], factor_sets[1:], dirs[1:]):
        for key in ("target_modules", "target_parameters"):
            if targets(config, key) != targets(configs[0], key):
                raise MoetuneError(
                    f"adapters have different targets: {dirs[0]} has {key}={targets(configs[0], key)}, {folder} "
                    f"has {targets(config, key)}; combine adapters with the same targets"
                )
        if set(factors) != set(first):
            odd = sorted(set(factors) ^ set(first))[0].removeprefix(SAVED_PREFIX)
            raise MoetuneError(
                f"adapters adapt different modules ({odd} is in only one of {dirs[0]} and {folder}); "
                "combine adapters with the same targets"
            )
        for key, f in factors.items():
            g = first[key]
            if (f.num_experts, f.lora_A.shape[1], f.lora_B.shape[0]) != (
                g.num_experts,
                g.lora_A.shape[1],
                g.lora_B.shape[0],
            ):
                raise MoetuneError(
                    f"adapters do not fit the same base: {key.removeprefix(SAVED_PREFIX)} is {g.num_experts} x "
                    f"{g.lora_B.shape[0]} x {g.lora_A.shape[1]} in {dirs[0]} but {f.num_experts} x "
                    f"{f.lora_B.shape[0]} x {f.lora_A.shape[1]} in {folder}"
                )


def _pad(a3: torch.Tensor, b3: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = rank - a3.shape[1]
    if extra == 0:
        return a3, b3
    return (
        torch.cat([a3, a3.new_zeros(a3.shape[0], extra, a3.shape[2])], dim=1),
        torch.cat([b3, b3.new_zeros(b3.shape[0], b3.shape[1], extra)], dim=2),
    )


@dataclass
class CombineReport:
    """What `combine_adapters` wrote; `str()` is what `moetune merge-adapters` prints."""

    adapters: list[Path]
    output: Path
    method: str
    weights: list[float]
    modules: int  # adapted modules / expert tensors in the result
    expert_tensors: int  # of which fused expert tensors (combined per expert)
    rank: int  # the one rank of the result (scaling 1)

    def __str__(self) -> str:
        weights = ", ".join(f"{w:g}" for w in self.weights)
        return (
            f"combined {len(self.adapters)} adapters ({self.method}, weights {weights}) into {self.output}: "
            f"{self.modules} modules ({self.expert_tensors} fused expert tensors, per expert), rank {self.rank}, "
            "scaling 1"
        )


def combine_adapters(
    adapter_dirs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    method: str,
    weights: Sequence[float] | None = None,
    density: float = 0.5,
    seed: int = 0,
) -> CombineReport:
    """Combine LoRA adapters of one base into a new PEFT adapter folder; returns what was written.

    method: linear | ties | dare_linear | dare_ties | svd (see the module docstring); weights: one per
    adapter (default 1 each); density: the share of values kept by ties / dare; seed: DARE's RNG seed.
    """
    from safetensors.torch import save_file

    dirs = [Path(d) for d in adapter_dirs]
    if len(dirs) < 2:
        raise MoetuneError("give at least two adapters to combine (repeat --adapter)")
    if method not in METHODS:
        raise MoetuneError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
    weights = [1.0] * len(dirs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(dirs) or not all(math.isfinite(w) for w in weights):
        raise MoetuneError(f"--weights needs {len(dirs)} finite numbers, one per adapter; got {weights}")
    if method in ("ties", "dare_linear", "dare_ties") and not 0 < density <= 1:
        raise MoetuneError(f"--density must be in (0, 1] for {method}; got {density}")
    out = Path(output)
    check_new_output(out)  # before the work, not only at the end

    loaded = [load_pairs(d) for d in dirs]
    configs, factor_sets = [c for c, _ in loaded], [f for _, f in loaded]
    _same_base(configs, dirs)
    _same_targets(configs, factor_sets, dirs)

    dtype = factor_sets[0][next(iter(factor_sets[0]))].lora_A.dtype
    for factors in factor_sets:
        for f in factors.values():
            dtype = torch.promote_types(dtype, f.lora_A.dtype)
    combined = {
        key: combine_factors([fs[key] for fs in factor_sets], weights, method, density, seed)
        for key in factor_sets[0]
    }
    rank = max(a3.shape[1] for a3, _ in combined.values())
    tensors = {}
    for key, (a3, b3) in combined.items():
        lora_a, lora_b = pack_experts(*_pad(a3, b3, rank))
        tensors[f"{key}.lora_A.weight"] = lora_a.to(dtype)
        tensors[f"{key}.lora_B.weight"] = lora_b.to(dtype)

    config = dict(configs[0])
    config.update(
        r=rank, lora_alpha=rank, rank_pattern={}, alpha_pattern={}, use_rslora=False, inference_mode=True
    )
    recipe = {
        "method": method,
        "adapters": [d.name for d in dirs],
        "weights": weights,
        **({"density": density} if method in ("ties", "dare_linear", "dare_ties") else {}),
        **({"seed": seed} if method.startswith("dare") else {}),
        "rank": rank,
    }
    with atomic_output_folder(out) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "combine_recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
        _write_combined_card(tmp, out.name, configs[0], dirs, recipe)
    experts = sum(1 for f in factor_sets[0].values() if f.num_experts > 1)
    return CombineReport(dirs, out, method, weights, len(combined), experts, rank)


def _write_combined_card(folder: Path, title: str, config: dict, dirs: list[Path], recipe: dict) -> None:
    from adapters.model_card import read_card_metadata, write_model_card

    datasets: list[str] = []
    for d in dirs:
        for name in read_card_metadata(d / "README.md").get("datasets") or []:
            if name not in datasets:
                datasets.append(name)
    write_model_card(
        folder,
        base_model=config.get("base_model_name_or_path"),
        kind="adapter",
        datasets=datasets,
        metrics={},
        recipe={"combine": recipe},
        title=title,
    )
