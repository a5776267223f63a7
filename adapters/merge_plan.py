"""The merge plan: for every adapted weight, its LoRA factors, scaling and checkpoint tensors.

`plan_merge` never loads the model. It builds the architecture on the meta device (no memory),
lets PEFT attach the adapter's config there, and so learns, for every adapted weight, exactly what
PEFT would do: the parameter, its shape, the layout of the LoRA factors, the scaling. It then finds
each weight in the base checkpoint. Checkpoints whose file layout differs from the model's
(transformers v5 keeps routed experts fused in memory, (E, 2I, H), but saves per-expert tensors
`experts.N.gate_proj.weight`, and Mixtral renames `mlp` to `block_sparse_moe`) are handled by
transformers' own reverse conversion (`revert_weight_conversion`), applied to the delta too, so
the merged model keeps exactly the base's keys, shapes and dtypes. Everything that can be refused
(an adapter for another base, a quantized base, a weight adapted twice) is refused here, before
anything is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from adapters.errors import MoetuneError
from adapters.peft_format import (
    SAVED_PREFIX,
    LoraPair,
    group_factors,
    read_adapter,
    read_adapter_config,
    trained_whole,
)
from adapters.provenance import check_base
from adapters.quiet import one_line, quiet_transformers
from adapters.safetensors_io import MERGEABLE, Checkpoint, shard_plan

MERGE_HANDLES = ("modules_to_save",)  # adapter features the merge handles beyond plain LoRA


@dataclass
class MergeTarget:
    """One adapted parameter of the model and where its pieces live in the checkpoint."""

    model_key: str  # e.g. "model.layers.1.mlp.experts.gate_up_proj"
    factors: LoraPair  # as saved, with PEFT's rank and scaling
    param_shape: tuple[int, ...]
    out_in: bool  # a 3D parameter stored (E, out, in) (PEFT swapped in/out); False: (E, in, out)
    disk_keys: list[str] = field(default_factory=list)  # checkpoint tensors it maps to (several: per expert)

    def delta(self) -> torch.Tensor:
        """The change of the parameter in float32, in the model's layout."""
        if len(self.param_shape) == 4:  # Conv2d (groups=1): PEFT's delta, conv(A^T, B)^T * scaling
            a, b = self.factors.lora_A.float(), self.factors.lora_B.float()  # (r, in, kh, kw), (out, r, 1, 1)
            return F.conv2d(a.transpose(0, 1), b).transpose(0, 1) * self.factors.scaling  # (out, in, kh, kw)
        delta = self.factors.delta()  # (E, out, in)
        if len(self.param_shape) == 2:
            return delta[0]
        return delta if self.out_in else delta.transpose(1, 2)


@dataclass
class MergePlan:
    """What the merge loop needs: the targets, where each checkpoint tensor's delta comes from, the
    tensors of fully trained modules that replace the base's, and the output's shards."""

    adapter_config: dict
    targets: list[MergeTarget]
    base_meta: object  # the base architecture on the meta device (transformers' weight conversions)
    owner: dict[str, MergeTarget]  # checkpoint key -> the target whose delta it gets
    replaced: dict[str, torch.Tensor]  # checkpoint key -> tensor of a module trained in full
    shards: list[tuple[str, list[str]]]  # output files and their keys, in order


def plan_merge(
    base: Path,
    adapter_dir: Path,
    checkpoint: Checkpoint,
    max_shard_size: str | int | None = None,
    *,
    check: bool = True,
) -> MergePlan:
    """Everything the merge will do, checked (see the module docstring); nothing is written yet.

    check: compare the adapter's recorded base with `base` first (`adapters.provenance.check_base`)."""
    refuse_quantized_base(base)
    adapter_config = read_adapter_config(adapter_dir, allow=MERGE_HANDLES)
    base_meta = meta_model(base)
    if check:
        check_base(adapter_dir, adapter_config, base_meta, str(base))
    targets = _adapted_parameters(base, adapter_dir)
    for target in targets:
        target.disk_keys = _disk_keys(target, base, checkpoint, base_meta)
    owner: dict[str, MergeTarget] = {}
    for target in targets:
        for key in target.disk_keys:
            if key in owner:  # two LoRA layers on one weight: PEFT would add both, moetune refuses to guess
                raise MoetuneError(
                    f"{adapter_dir} adapts {key} twice ({owner[key].model_key}, {target.model_key})"
                )
            owner[key] = target
    replaced = _replacements(adapter_dir, checkpoint)
    shards = shard_plan(checkpoint, max_shard_size)
    return MergePlan(adapter_config, targets, base_meta, owner, replaced, shards)


def _adapted_parameters(base: Path, adapter_dir: Path) -> list[MergeTarget]:
    """Every weight the adapter changes, as PEFT attaches it to the meta base: parameter, shape, layout,
    factors and scaling; the saved factors are checked against what PEFT expects."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora.layer import Conv2d as LoraConv2d
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    # Refuses unsupported adapter features with a clear message; fully trained modules are merged apart.
    config, tensors = read_adapter(adapter_dir, allow=MERGE_HANDLES)
    full = trained_whole(tensors, config)
    saved = group_factors(
        {k: v for k, v in tensors.items() if k not in full}, str(adapter_dir), allow_conv=True
    )
    try:
        lora_config = LoraConfig.from_pretrained(str(adapter_dir))
    except Exception as err:
        raise MoetuneError(
            f"{adapter_dir}/adapter_config.json is not a LoRA config PEFT reads: {one_line(err)}"
        ) from err
    lora_config.inference_mode = True
    peft_meta = meta_model(base)
    try:
        with quiet_transformers():
            inject_adapter_in_model(lora_config, peft_meta, adapter_name="default", low_cpu_mem_usage=True)
    except (ValueError, TypeError, KeyError, RuntimeError) as err:
        raise MoetuneError(f"adapter {adapter_dir} does not fit base {base}: {one_line(err)}") from err

    targets: list[MergeTarget] = []
    for name, module in peft_meta.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
            continue
        if isinstance(module, ParamWrapper):
            model_key = f"{name.replace('.base_layer', '')}.{module.parameter_name}"
            shape, experts = tuple(module.get_param().shape), module.num_experts
            out_in = module._did_swap_in_out_features or len(shape) == 2
        elif (
            isinstance(module, LoraLinear)
            or isinstance(module, LoraConv2d)
            and module.get_base_layer().groups == 1
        ):
            model_key, shape, experts, out_in = (
                f"{name}.weight",
                tuple(module.base_layer.weight.shape),
                1,
                True,
            )
        else:
            raise MoetuneError(
                f"{adapter_dir} puts LoRA on {name}, a {type(module.get_base_layer()).__name__}; moetune merges "
                "LoRA on Linear and Conv2d layers and on expert parameters (target_parameters) only"
            )
        key = SAVED_PREFIX + name
        if key not in saved:
            raise MoetuneError(
                f"{adapter_dir} has no LoRA weights for {name}, which its config targets in {base}"
            )
        lora_a, lora_b = saved.pop(key)
        want_a, want_b = module.lora_A["default"].weight.shape, module.lora_B["default"].weight.shape
        if lora_a.shape != want_a or lora_b.shape != want_b:
            raise MoetuneError(
                f"adapter {adapter_dir} does not fit base {base}: {name} has lora_A {tuple(lora_a.shape)} / lora_B "
                f"{tuple(lora_b.shape)}, the base needs {tuple(want_a)} / {tuple(want_b)} (an adapter for another base?)"
            )
        factors = LoraPair(key, lora_a, lora_b, module.r["default"], module.scaling["default"], experts)
        targets.append(MergeTarget(model_key, factors, shape, out_in))
    if saved:
        extra = next(iter(saved)).removeprefix(SAVED_PREFIX)
        raise MoetuneError(
            f"adapter {adapter_dir} has LoRA weights for {extra}, which {base} does not have (an adapter for another base?)"
        )
    if not targets:
        raise MoetuneError(f"adapter {adapter_dir} adapts nothing in {base}")

    return targets


def _disk_keys(target: MergeTarget, base: Path, checkpoint: Checkpoint, base_meta) -> list[str]:
    """The checkpoint tensors a target's parameter is stored as (itself, or per-expert pieces)."""
    from transformers.core_model_loading import revert_weight_conversion

    entry = checkpoint.entries.get(target.model_key)
    if entry is not None and tuple(entry.shape) == target.param_shape:
        disk_keys = [target.model_key]
    else:  # the checkpoint stores it differently (per-expert tensors, renamed modules)
        probe = {target.model_key: torch.empty(target.param_shape, device="meta")}
        with quiet_transformers():
            pieces = revert_weight_conversion(base_meta, probe)
        for disk_key, piece in pieces.items():
            entry = checkpoint.entries.get(disk_key)
            if entry is None or tuple(entry.shape) != tuple(piece.shape):
                found = "missing" if entry is None else f"of shape {tuple(entry.shape)}"
                raise MoetuneError(
                    f"{base} has no weight for {target.model_key} (looked for {disk_key} {tuple(piece.shape)}: "
                    f"{found}); is this the base the adapter was trained on?"
                )
        disk_keys = list(pieces)
    for disk_key in disk_keys:
        dtype = checkpoint.entries[disk_key].dtype
        if dtype not in MERGEABLE:
            raise MoetuneError(
                f"{base}: {disk_key} is stored as {dtype} (quantised); merge into a float16 / bfloat16 / "
                "float32 copy of the base instead"
            )
    return disk_keys


def delta_pieces(target: MergeTarget, base_meta) -> dict[str, torch.Tensor]:
    """{checkpoint key: float32 delta} of one target (one tensor, or per-expert pieces)."""
    from transformers.core_model_loading import revert_weight_conversion

    delta = target.delta()
    if target.disk_keys == [target.model_key]:
        return {target.model_key: delta}
    with quiet_transformers():
        return dict(revert_weight_conversion(base_meta, {target.model_key: delta}))


def _replacements(adapter: Path, checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """{checkpoint key: tensor} for the adapter's fully trained modules, shapes checked against the base."""
    config, tensors = read_adapter(adapter, allow=MERGE_HANDLES)
    out = {}
    for key, tensor in trained_whole(tensors, config).items():
        model_key = key[len(SAVED_PREFIX) :]
        entry = checkpoint.entries.get(model_key)
        if entry is None or tuple(entry.shape) != tuple(tensor.shape):
            found = "missing" if entry is None else f"of shape {tuple(entry.shape)}"
            raise MoetuneError(
                f"{adapter} trains {model_key} {tuple(tensor.shape)} in full, but the base has it {found}; "
                "an adapter for another base?"
            )
        out[model_key] = tensor
    return out


def refuse_quantized_base(base: Path) -> None:
    """A merge adds B A to the float weights: a folder whose weights are stored quantized cannot take it."""
    try:
        config = json.loads((base / "config.json").read_text())
    except (OSError, ValueError):
        return  # Checkpoint names what is wrong with the folder
    quantization = config.get("quantization_config") or (config.get("text_config") or {}).get(
        "quantization_config"
    )
    if quantization:
        method = quantization.get("method") or quantization.get("quant_method", "quantized")
        raise MoetuneError(
            f"{base} stores its weights quantized ({method}); merge needs the full-precision base: pass the "
            f"float model the quantized one was made from (the adapter is an adapter of that model too)"
        )


def meta_model(base: Path):
    """The base's architecture on the meta device (no memory), from its config.json."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(base, trust_remote_code=False, local_files_only=True)
    except Exception as err:
        raise MoetuneError(
            f"cannot read the architecture of {base} from config.json ({one_line(err)}); is it a model folder? "
            "(moetune's built-in architecture is registered by the moetune CLI)"
        ) from err
    try:
        with quiet_transformers(), torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as err:
        raise MoetuneError(f"cannot build the architecture of {base} ({one_line(err)})") from err
