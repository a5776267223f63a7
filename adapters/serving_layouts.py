"""Expert adapters in the layouts vLLM and SGLang load, per model family (see docs/serving.md).

What the loaders require (read from their sources; the table and citations are in docs/serving.md):
- one rank and one scaling for the whole adapter: vLLM's PEFTHelper and SGLang's LoRAAdapter read
  `r` and `lora_alpha` once and ignore `rank_pattern` / `alpha_pattern`. So every pair is padded to
  the largest rank R with zero rows of A and zero columns of B (the delta does not change), each
  pair's own scaling is folded into B, and the config says `r = lora_alpha = R` (scaling 1).
- per-expert (2D) layout, vLLM's `FusedMoEWithLoRA` and SGLang's MoE memory pool:
  `<ffn>.experts.{e}.<gate>|<up>|<down>.lora_A|B.weight`, and vLLM's `pack_moe` asserts that every
  expert of a layer carries all three. A fused `gate_up_proj` [E, 2I, H] becomes a gate and an up
  pair that share expert e's A (exact: gate's delta is B_gate A, up's is B_up A); which rows of B are
  gate depends on the family: concatenated [gate; up] (DeepSeek-V3, Qwen3-MoE, Mixtral, moetune) or
  interleaved gate0, up0, gate1, ... (GPT-OSS). Experts an ESFT selection left out, and projections
  the adapter did not train, get a zero B and a fresh A drawn as PEFT draws one (kaiming-uniform), so
  the pair is well formed, adds nothing, and can be trained further.
- fused (3D) layout, vLLM's `FusedMoE3DWithLoRA` for classes with `is_3d_moe_weight = True`
  (GPT-OSS): PEFT's own `target_parameters` files, `experts.base_layer.lora_A|B` = gate_up_proj and
  `experts.lora_A|B` = down_proj, B rows in the checkpoint's order (interleaved for GPT-OSS).
The family comes from the base's `config.json` `model_type`, never from tensor shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adapters.errors import MoetuneError
from adapters.peft_format import SAVED_PREFIX, AdapterFactors, Factors, pack_experts, wrapper_keys

TARGETS = ("vllm", "sglang")
PER_EXPERT, FUSED = "per-expert", "fused"
CONCATENATED, INTERLEAVED = "concatenated", "interleaved"
# vllm/config/lora.py MaxLoRARanks: the values --max-lora-rank accepts
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_HF_NAMES = ("gate_proj", "up_proj", "down_proj")
# config.json names of the routed-expert count (transformers writes attribute-mapped names, e.g.
# Qwen3-MoE's num_experts as num_local_experts), first match wins
EXPERT_COUNT_FIELDS = ("n_routed_experts", "num_local_experts", "num_experts")


@dataclass(frozen=True)
class ServingFamily:
    """How one model family's experts are stored in transformers and loaded by the servers."""

    gate_up: str  # order of gate and up rows in the fused gate_up_proj: CONCATENATED | INTERLEAVED
    vllm_layout: str = PER_EXPERT  # FUSED where vLLM's model class sets is_3d_moe_weight = True
    vllm_ffn: str = "mlp"  # module vLLM's model class keeps the experts under
    vllm_names: tuple[str, str, str] = _HF_NAMES  # gate, up, down names in vLLM's expert mapping


FAMILIES = {
    # no vLLM / SGLang class of its own: the per-expert layout under Qwen3-MoE's names
    "moetune": ServingFamily(CONCATENATED),
    "deepseek_v3": ServingFamily(CONCATENATED),
    "qwen3_moe": ServingFamily(CONCATENATED),
    # vLLM's MixtralForCausalLM keeps the original checkpoint names (block_sparse_moe, w1 / w3 / w2)
    "mixtral": ServingFamily(CONCATENATED, vllm_ffn="block_sparse_moe", vllm_names=("w1", "w3", "w2")),
    "gpt_oss": ServingFamily(INTERLEAVED, vllm_layout=FUSED),
}


def serving_family(base_config: dict, where: str) -> tuple[str, ServingFamily]:
    """(model_type, family) of a base model's config.json; one line naming the known ones otherwise."""
    model_type = base_config.get("model_type")
    if model_type not in FAMILIES:
        raise MoetuneError(
            f"{where}: no serving layout is known for model_type {model_type!r} (known: "
            f"{', '.join(FAMILIES)}); keep --format per-expert for storage, or merge the adapter"
        )
    return model_type, FAMILIES[model_type]


def layout_of(family: ServingFamily, target: str) -> str:
    """PER_EXPERT or FUSED: what `target` loads for this family."""
    return family.vllm_layout if target == "vllm" else PER_EXPERT


@dataclass
class ServingExport:
    """What a serving export holds (`--format vllm | sglang`); `str()` is its summary."""

    target: str
    layout: str  # PER_EXPERT | FUSED
    model_type: str
    gate_up: str  # CONCATENATED | INTERLEAVED
    rank: int
    experts: dict[str, int]  # experts module -> its number of experts
    filled: int  # (weight, expert) pairs without LoRA, written as zero B + fresh A
    serve: str  # the server command line (BASE, NAME, OUT placeholders)

    def __str__(self) -> str:
        layers = len(self.experts)
        if self.layout == PER_EXPERT:
            pairs = f"{3 * sum(self.experts.values())} per-expert LoRA pairs (gate, up, down of every expert"
        else:
            pairs = f"{2 * layers} fused expert LoRA pairs (gate_up and down, all experts"
        text = (
            f"{self.layout} layout for {self.model_type}: {pairs} of {layers} MoE layer(s), gate/up "
            f"{self.gate_up}), rank {self.rank} everywhere"
        )
        if self.filled:
            text += f", {self.filled} (weight, expert) pairs without LoRA written as zero B + fresh A"
        return f"{text}; serve: {self.serve}"


def serving_export(
    factors: AdapterFactors, base_config: dict, target: str, rank: int | None = None, base_name: str = "BASE"
) -> tuple[dict, dict[str, torch.Tensor], dict, ServingExport]:
    """(adapter_config, tensors, moetune_export.json, what it holds) of the `target` layout of an adapter."""
    model_type, family = serving_family(base_config, f"{base_name}/config.json")
    _refuse_unservable(factors, target)
    _check_experts(factors, base_config, base_name)
    rank = _serving_rank(factors, rank, target)
    layout = layout_of(family, target)
    weights, modules, params, fresh = _serving_tensors(factors, family, target, layout, rank)
    config = dict(factors.config)
    config.update(
        r=rank,
        lora_alpha=rank,  # scaling 1: each pair's own scaling is inside its B
        use_rslora=False,
        rank_pattern={},
        alpha_pattern={},
        target_modules=sorted(modules),
        target_parameters=sorted(params) or None,  # PEFT's marker of the fused layout
        modules_to_save=None,
    )
    experts = {prefix: next(iter(s.values())).a.shape[0] for prefix, s in factors.experts.items()}
    export = ServingExport(
        target, layout, model_type, family.gate_up, rank, experts, fresh, serve_command(target, rank)
    )
    meta = {
        "format": target,
        "layout": layout,
        "model_type": model_type,
        "gate_up": family.gate_up,
        "rank": rank,
        "experts": experts,
        "serve": export.serve,
    }
    if target == "vllm":
        meta["is_3d_lora_weight"] = layout == FUSED  # for --enable-mixed-moe-lora-format requests
    return config, weights, meta, export


def serve_command(target: str, rank: int) -> str:
    """The server flags this export needs (BASE, NAME and OUT are placeholders)."""
    if target == "vllm":
        max_rank = next(r for r in VLLM_MAX_LORA_RANKS if r >= rank)
        return f"vllm serve BASE --enable-lora --max-lora-rank {max_rank} --lora-modules NAME=OUT"
    return (
        "python -m sglang.launch_server --model-path BASE --enable-lora "
        f"--max-lora-rank {rank} --lora-paths NAME=OUT"
    )


def _refuse_unservable(factors: AdapterFactors, target: str) -> None:
    """No expert LoRA at all, or modules trained whole: nothing a LoRA server can take."""
    if not factors.experts:
        raise MoetuneError(
            f"{factors.source}: this adapter has no expert LoRA (no fused expert target_parameters); "
            f"--format {target} writes expert layouts: serve this adapter as it is (PEFT layout)"
        )
    trained = factors.config.get("modules_to_save") or factors.full
    if trained:
        raise MoetuneError(
            f"{factors.source}: the adapter trains whole modules ({', '.join(trained)}), which {target} "
            "cannot load as LoRA; merge it into the base instead (moetune merge)"
        )


def _serving_tensors(factors: AdapterFactors, family: ServingFamily, target: str, layout: str, rank: int):
    """(tensors, module names, fused parameter names, number of experts filled) of the export."""
    gen = torch.Generator().manual_seed(0)  # fresh A of untrained experts: the same bytes every run
    weights: dict[str, torch.Tensor] = {}
    modules: list[str] = []
    for name, pair in factors.modules.items():
        weights.update(_pair_keys(name, *_fold(pair, rank)))
        modules.append(name)
    params, fresh = [], 0
    for prefix, stacks in factors.experts.items():
        gate_up, down, filled = _complete(stacks, rank, gen)
        fresh += filled
        if layout == FUSED:
            keys = wrapper_keys(prefix, ["gate_up_proj", "down_proj"])  # PEFT's nesting
            for pname, (a, b) in (("gate_up_proj", gate_up), ("down_proj", down)):
                packed_a, packed_b = pack_experts(a, b)
                weights[f"{keys[pname]}.lora_A.weight"], weights[f"{keys[pname]}.lora_B.weight"] = (
                    packed_a,
                    packed_b,
                )
                params.append(f"{prefix}.{pname}")
        else:
            names, keys = _per_expert_keys(prefix, gate_up, down, family, target)
            weights.update(keys)
            modules += names
    return weights, modules, params, fresh


def _check_experts(factors: AdapterFactors, base_config: dict, base_name: str) -> None:
    """Every expert stack has the base's expert count and a gated up projection."""
    field = next((f for f in EXPERT_COUNT_FIELDS if f in base_config), None)
    expected = base_config.get(field)
    for prefix, stacks in factors.experts.items():
        if "up_proj" in stacks:
            raise MoetuneError(
                f"{factors.source}: {prefix}.up_proj is an ungated experts weight; the serving layouts "
                "here cover gated experts (gate_up_proj + down_proj) only"
            )
        found = next(iter(stacks.values())).a.shape[0]
        if expected is not None and found != expected:
            raise MoetuneError(
                f"{factors.source}: {prefix} has {found} experts but {base_name} has {field}={expected}; "
                "the adapter was trained on another base (pass its --base)"
            )


def _serving_rank(factors: AdapterFactors, rank: int | None, target: str) -> int:
    """The one rank of the export: the largest in the adapter, or `rank` when it is not smaller."""
    pairs = [(f.rank, name) for name, f in factors.modules.items()]
    pairs += [(f.rank, f"{prefix}.{p}") for prefix, s in factors.experts.items() for p, f in s.items()]
    largest, where = max(pairs)
    if rank is not None and rank < largest:
        raise MoetuneError(
            f"--rank {rank} is below the adapter's largest rank {largest} ({where}); pass --rank {largest} "
            "or more (pairs are padded up, never cut)"
        )
    rank = rank or largest
    if target == "vllm" and rank > VLLM_MAX_LORA_RANKS[-1]:
        raise MoetuneError(f"rank {rank} is above vLLM's largest --max-lora-rank {VLLM_MAX_LORA_RANKS[-1]}")
    return rank


def _fold(pair: Factors, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) padded to `rank` (zero rows of a, zero columns of b) with the pair's scaling inside b.

    Works for a module pair (a (r, in), b (out, r)) and an expert stack (a (E, r, in), b (E, out, r)).
    """
    pad = rank - pair.rank
    a = F.pad(pair.a.float(), (0, 0, 0, pad))
    b = F.pad(pair.b.float() * pair.scaling, (0, pad))
    return a.to(pair.a.dtype), b.to(pair.b.dtype)


def _complete(stacks: dict[str, Factors], rank: int, gen: torch.Generator):
    """Folded (a, b) of gate_up_proj and down_proj, every expert well formed; and how many were filled.

    A missing weight gets stacks of zeros; then every expert whose A is all zero (left out by an ESFT
    selection, or never trained) gets a fresh kaiming-uniform A (PEFT's init) and a zero B.
    """
    some = next(iter(stacks.values()))
    num_experts, dtype = some.a.shape[0], some.a.dtype
    if "gate_up_proj" in stacks:
        hidden, inter2 = stacks["gate_up_proj"].a.shape[-1], stacks["gate_up_proj"].b.shape[1]
    else:
        hidden, inter2 = stacks["down_proj"].b.shape[1], 2 * stacks["down_proj"].a.shape[-1]
    shapes = {"gate_up_proj": (hidden, inter2), "down_proj": (inter2 // 2, hidden)}  # (in, out)
    result, filled = [], 0
    for pname, (fan_in, fan_out) in shapes.items():
        if pname in stacks:
            a, b = _fold(stacks[pname], rank)  # new tensors: filled in place below
        else:
            a = torch.zeros(num_experts, rank, fan_in, dtype=dtype)
            b = torch.zeros(num_experts, fan_out, rank, dtype=dtype)
        for e in a.flatten(1).eq(0).all(1).nonzero().flatten().tolist():
            fresh = torch.empty(rank, fan_in)
            torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=gen)
            a[e], b[e] = fresh.to(dtype), 0
            filled += 1
        result.append((a, b))
    return result[0], result[1], filled


def _pair_keys(name: str, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    return {f"{SAVED_PREFIX}{name}.lora_A.weight": a, f"{SAVED_PREFIX}{name}.lora_B.weight": b}


def _per_expert_keys(prefix: str, gate_up, down, family: ServingFamily, target: str):
    """Module names and tensors of the per-expert layout, named as `target` names them."""
    names = family.vllm_names if target == "vllm" else _HF_NAMES
    ffn, _, _ = prefix.rpartition(".experts")
    if target == "vllm":
        ffn = f"{ffn.rpartition('.')[0]}.{family.vllm_ffn}"
    (a_up, b_up), (a_down, b_down) = gate_up, down
    if family.gate_up == INTERLEAVED:  # rows gate0, up0, gate1, up1, ...
        b_gate, b_upper = b_up[:, 0::2], b_up[:, 1::2]
    else:  # [gate; up]
        half = b_up.shape[1] // 2
        b_gate, b_upper = b_up[:, :half], b_up[:, half:]
    modules, tensors = [], {}
    for e in range(a_up.shape[0]):
        for proj, a, b in zip(names, (a_up, a_up, a_down), (b_gate, b_upper, b_down)):
            module = f"{ffn}.experts.{e}.{proj}"
            tensors.update(_pair_keys(module, a[e].clone(), b[e].clone()))  # own storage: safetensors
            modules.append(module)
    return modules, tensors
