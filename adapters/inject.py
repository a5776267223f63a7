"""Build the PEFT config from groups, attach the adapter, and switch experts to the fast path.

`apply_lora` turns moetune's adapter settings (groups, layers, per-group rank, router mode, ESFT
selection) into a plain `peft.LoraConfig` with exact module names (`target_modules`) and exact
fused-expert parameter names (`target_parameters`), so the adapter folder is PEFT's own and plain
`PeftModel.from_pretrained` loads it. The routed expert computation is then switched on with
`adapters.expert_fast_path.install_fast_path`. Unsupported combinations are refused here, at construction.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from adapters.errors import MoetuneError
from adapters.expert_fast_path import exposed_quantized_weights, install_fast_path
from adapters.peft_format import saved_shapes, split_experts
from adapters.selection import load_selection
from adapters.targets import ALL_GROUPS, clean_name, did_you_mean, find_targets, layer_of, resolve_targets

logger = logging.getLogger("moetune")

ROUTER_MODES = ("frozen", "train", "lora")
# PEFT init schemes that make sense for a stack of experts: they never read the base weight.
EXPERT_INITS = (True, False, "gaussian")


@contextmanager
def _quiet_peft():
    """PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing`; that FutureWarning is theirs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        # rank/alpha patterns keyed by parameter names work (ParamWrapper reads them), but PEFT's
        # check looks at module names only; apply_lora verifies every target itself.
        warnings.filterwarnings("ignore", message=".*_pattern keys did not match any targeted module.*")
        yield


def apply_lora(
    model: nn.Module,
    *,
    targets,
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.0,
    layers=None,
    experts=None,
    router: str = "frozen",
    use_rslora: bool = False,
    group_overrides: dict | None = None,
    init_lora_weights=True,
    adapter_name: str = "default",
) -> PeftModel:
    """Attach a LoRA adapter to `model` and return the `PeftModel` (fast expert path installed).

    targets: group names (attention, experts, shared_experts, router, dense_mlp; multimodal models:
        encoders, projector) and/or raw module or parameter names. A group that matches nothing
        raises MoetuneError naming the groups present.
    layers: None (all), a list of layer indices, or a "start-end" range (inclusive).
    experts: None (all experts), or an ESFT selection {layer: [expert ids]} / a path to selection.json:
        expert LoRA only on the selected experts (others get zero, untrained factors), and only in
        the layers the selection names.
    router: "frozen" (default), "train" (the router weight itself is trained and saved), or "lora".
    group_overrides: {group: {"r": .., "alpha": ..}} per-group rank / alpha (PEFT rank/alpha_pattern).
    """
    if isinstance(model, PeftModel):
        raise MoetuneError("apply_lora got a model that already has adapters; pass the base model")
    with exposed_quantized_weights(model):  # quantized experts show PEFT float placeholders meanwhile
        _check_settings(r, alpha, dropout, router, group_overrides)
        requested = targets.split(",") if isinstance(targets, str) else list(targets or [])
        requested = [t.strip() for t in requested if t.strip()]
        if router == "lora" and "router" not in requested:
            requested.append("router")
        if router != "lora" and "router" in requested:
            raise MoetuneError(
                f"adapter.targets contains 'router' but adapter.router is '{router}'; set router: lora"
            )
        resolved = resolve_targets(model, requested, layers)

        selection = None
        if experts is not None:
            selection = load_selection(experts)
            _apply_selection_to_targets(model, resolved, selection)

        _refuse_unsupported(resolved, requested, dropout, init_lora_weights)
        modules_to_save = _modules_to_save(model, resolved, router, layers)
        _avoid_peft_v4_renames(model, resolved)
        rank_pattern, alpha_pattern = _patterns(resolved, group_overrides or {})
        config = LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=sorted(resolved.modules),
            target_parameters=sorted(resolved.parameters) or None,
            use_rslora=use_rslora,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            modules_to_save=modules_to_save or None,
            init_lora_weights=init_lora_weights,
            bias="none",
        )
        with _quiet_peft():
            peft_model = get_peft_model(model, config, adapter_name=adapter_name)
        _check_all_wrapped(peft_model, resolved, adapter_name)
        if selection is not None:
            _zero_unselected(peft_model, selection, adapter_name)
        install_fast_path(peft_model)
        if router != "frozen":
            _keep_aux_loss_on(peft_model)
        return peft_model


def load_adapter(
    model: nn.Module,
    folder,
    is_trainable: bool = False,
    adapter_name: str = "default",
    base: str | None = None,
) -> PeftModel:
    """Load a PEFT adapter folder (moetune's or plain PEFT's) onto `model`, with the fast expert path.

    base: the MODEL name `model` was loaded from (default: `model.name_or_path`), compared with the
    base the adapter records (see `adapters.provenance`: a different name warns, a different
    architecture is refused). Refuses, with one line, a folder that is not an adapter and an adapter
    that does not fit the base (modules missing, shapes differing, or weights in the file that nothing
    would use), naming both bases.
    """
    from adapters.provenance import check_base, mismatch_error

    folder = Path(folder)
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise MoetuneError(f"{folder}: no adapter_config.json; give the folder that save_pretrained wrote")
    try:
        adapter_config = json.loads(config_file.read_text())
    except ValueError as err:
        raise MoetuneError(f"{config_file} is not valid JSON ({err}); re-save the adapter") from None
    given = base or getattr(model, "name_or_path", None) or type(model).__name__
    check_base(folder, adapter_config, model, given)
    try:
        with _quiet_peft(), exposed_quantized_weights(model):
            peft_model = PeftModel.from_pretrained(
                model, str(folder), adapter_name=adapter_name, is_trainable=is_trainable
            )
    except (ValueError, RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise mismatch_error(folder, adapter_config, given, first[:300]) from None
    unused_or_missing = _unused_or_missing_weights(peft_model, folder, adapter_name)
    if unused_or_missing:
        raise mismatch_error(folder, adapter_config, given, unused_or_missing)
    install_fast_path(peft_model)
    return peft_model


# ----------------------------------------------------------------------------- helpers


def _check_settings(r, alpha, dropout, router, group_overrides) -> None:
    if not isinstance(r, int) or r <= 0:
        raise MoetuneError(f"adapter.r={r!r} must be a positive integer (typical: 8-64)")
    if alpha <= 0:
        raise MoetuneError(f"adapter.alpha={alpha!r} must be positive (typical: 2 * r)")
    if not 0.0 <= dropout < 1.0:
        raise MoetuneError(f"adapter.dropout={dropout!r} must be in [0, 1)")
    if router not in ROUTER_MODES:
        raise MoetuneError(f"adapter.router={router!r} must be one of {', '.join(ROUTER_MODES)}")
    for group, values in (group_overrides or {}).items():
        if group not in ALL_GROUPS:
            raise MoetuneError(
                f"adapter.group_overrides: unknown group '{group}';{did_you_mean(group, ALL_GROUPS)} "
                f"groups: {', '.join(ALL_GROUPS)}"
            )
        if not isinstance(values, dict) or set(values) - {"r", "alpha"}:
            raise MoetuneError(f"adapter.group_overrides.{group} takes only r and alpha, got {values!r}")
        if "r" in values and (not isinstance(values["r"], int) or values["r"] <= 0):
            raise MoetuneError(
                f"adapter.group_overrides.{group}.r={values['r']!r} must be a positive integer"
            )
        if "alpha" in values and values["alpha"] <= 0:
            raise MoetuneError(f"adapter.group_overrides.{group}.alpha={values['alpha']!r} must be positive")


def _refuse_unsupported(resolved, requested, dropout, init_lora_weights) -> None:
    """Combinations PEFT would accept and then get wrong, or fail on deep inside: refused here, in one line."""
    if not resolved.modules and not resolved.parameters:
        raise MoetuneError(
            f"adapter.targets {requested}: {', '.join(sorted(set(resolved.full.values())))} trains whole "
            "modules (PEFT modules_to_save), and PEFT needs at least one LoRA target besides; add a group, "
            "e.g. targets: [encoders, projector]"
        )
    expert_params = [n for n, g in resolved.parameters.items() if g == "experts"]
    if dropout and expert_params:
        raise MoetuneError(
            f"adapter.dropout={dropout} cannot apply to expert LoRA: PEFT adapts a fused expert weight "
            "as W + s·B·A, where inputs cannot be dropped per expert; set dropout: 0, or leave out experts"
        )
    if expert_params and init_lora_weights not in EXPERT_INITS:
        raise MoetuneError(
            f"adapter init '{init_lora_weights}' needs a 2D base weight; for fused experts use one of "
            "true (kaiming A, zero B), false, gaussian"
        )


def _modules_to_save(model, resolved, router, layers) -> list[str]:
    """Modules trained whole (PEFT modules_to_save): e.g. the multimodal projector group, a trained router."""
    modules_to_save = sorted(resolved.full)
    if router == "train":
        found = [t for t in find_targets(model) if t.group == "router"]
        chosen = _filter_layers(found, layers)
        if not chosen:
            raise MoetuneError("adapter.router: train, but this model has no router in the chosen layers")
        modules_to_save += sorted(
            t.name.removesuffix(".weight") if t.kind == "parameter" else t.name for t in chosen
        )
    return modules_to_save


def _filter_layers(found, layers):
    from adapters.targets import parse_layers

    chosen = parse_layers(layers)
    return [t for t in found if chosen is None or t.layer in chosen]


def _apply_selection_to_targets(model, resolved, selection) -> None:
    """Keep expert LoRA only in layers whose selection is non-empty; check the ids exist."""
    expert_names = [n for n, g in resolved.parameters.items() if g == "experts"]
    if not expert_names:
        raise MoetuneError("adapter.experts (a selection) is set but 'experts' is not in adapter.targets")
    layers_with_experts = {layer_of(n) for n in expert_names}
    unknown = sorted(set(selection) - layers_with_experts)
    if unknown:
        raise MoetuneError(
            f"adapter.experts: layers {unknown} have no targeted routed experts; "
            f"MoE layers here: {sorted(layers_with_experts)}"
        )
    for name in expert_names:
        num_experts = getattr(model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]).shape[0]
        chosen = selection.get(layer_of(name), [])
        if any(e >= num_experts for e in chosen):
            raise MoetuneError(
                f"adapter.experts: layer {layer_of(name)} selects expert {max(chosen)} but has {num_experts} experts"
            )
        if not chosen:
            del resolved.parameters[name]
    if not any(g == "experts" for g in resolved.parameters.values()):
        raise MoetuneError(
            "adapter.experts: the selection chooses no expert in any layer; lower nothing, check it"
        )


def _avoid_peft_v4_renames(model, resolved) -> None:
    """Target as 2D parameters the modules that PEFT would rename to fused experts.

    For MoE families whose layout changed in transformers v5 (DeepSeek-V3, Qwen3-MoE, ... map to the
    qwen2_moe pattern), PEFT 0.21 rewrites a `target_modules` entry ending in gate_proj / up_proj /
    down_proj into the fused `experts.gate_up_proj` / `experts.down_proj` parameters (with doubled
    rank), both when creating and when loading an adapter: a shared-expert or dense-MLP target would
    silently become an expert target. A `target_parameters` entry `<module>.weight` is not rewritten,
    adapts the same nn.Linear (as W + s·B·A), and plain PEFT loads it the same way.
    """
    if not resolved.modules:
        return
    renamed = _peft_renames(model, resolved.modules)
    for name in renamed:
        group = resolved.modules.pop(name)
        resolved.parameters[f"{name}.weight"] = group


def _peft_renames(model, names) -> set[str]:
    """The module names PEFT's v4 -> v5 config conversion would drop from target_modules for `model`."""
    try:
        from peft.utils.transformers_weight_conversion import (
            convert_peft_config_for_transformers,
            get_model_conversion_mapping,
        )
    except ImportError:  # a PEFT without the conversion: nothing is renamed
        return set()
    probe = LoraConfig(target_modules=set(names), target_parameters=None)
    convert_peft_config_for_transformers(probe, model=model, conversions=get_model_conversion_mapping(model))
    return set(names) - set(probe.target_modules or ())


def _patterns(resolved, overrides):
    """Per-group rank / alpha as PEFT rank_pattern / alpha_pattern keyed by exact names (plain PEFT reads them)."""
    rank_pattern, alpha_pattern = {}, {}
    for group, values in overrides.items():
        names = resolved.names_in(group)
        if not names:
            raise MoetuneError(f"adapter.group_overrides.{group}: that group is not among adapter.targets")
        for name in names:
            if "r" in values:
                rank_pattern[re.escape(name)] = values["r"]
            if "alpha" in values:
                alpha_pattern[re.escape(name)] = values["alpha"]
    return rank_pattern, alpha_pattern


def _check_all_wrapped(peft_model, resolved, adapter_name) -> None:
    """Every resolved name got a LoRA layer: never a silently partial adapter."""
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    wrapped = set()
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            clean = clean_name(name)
            wrapped.add(f"{clean}.{module.parameter_name}" if isinstance(module, ParamWrapper) else clean)
    missing = sorted((set(resolved.modules) | set(resolved.parameters)) - wrapped)
    if missing:
        raise MoetuneError(f"PEFT did not adapt {len(missing)} requested targets (first: {missing[0]})")


def _zero_unselected(peft_model, selection, adapter_name) -> None:
    """Zero A and B of experts outside the selection: no delta, zero gradients, so they stay zero."""
    from peft.tuners.lora.layer import ParamWrapper

    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if (
                not isinstance(module, ParamWrapper)
                or adapter_name not in module.lora_A
                or module.num_experts < 2
            ):
                continue
            chosen = selection.get(layer_of(clean_name(name)), None)
            if chosen is None:
                continue
            keep = torch.zeros(module.num_experts, dtype=torch.bool)
            keep[chosen] = True
            lora_a, lora_b = split_experts(  # views of PEFT's stacked factors: (E, r, in), (E, out, r)
                module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight, module.num_experts
            )
            lora_a[~keep] = 0
            lora_b[~keep] = 0


def _keep_aux_loss_on(peft_model) -> None:
    """A trained router keeps the load-balancing loss: families that add it only on request get asked."""
    config = getattr(peft_model.get_base_model(), "config", None)
    if config is None or not hasattr(config, "output_router_logits"):
        return
    if not config.output_router_logits and getattr(config, "router_aux_loss_coef", 0) > 0:
        config.output_router_logits = True
        logger.warning(
            "router is trained: turned on config.output_router_logits so the load-balancing aux loss "
            "(router_aux_loss_coef=%s) is added to the loss",
            config.router_aux_loss_coef,
        )


def _unused_or_missing_weights(peft_model, folder: Path, adapter_name: str) -> str:
    """What differs between the adapter file's tensors and the model's adapter weights ("" if nothing).

    A frozen embedding / lm_head under LoRA is optional: PEFT's default `save_embedding_layers="auto"`
    writes its base weight (`lm_head.base_layer.weight`) whenever an embedding layer is a target, and
    `moetune train` leaves it out (the vocabulary is never resized, so it is the base's own). Both load.
    """
    from peft.utils import get_peft_model_state_dict

    in_file = set(saved_shapes(folder))
    if not in_file:
        return ""  # no safetensors file: PEFT already refused (or loaded a .bin); nothing to compare
    with warnings.catch_warnings():  # "Setting save_embedding_layers to True": we ask for both on purpose
        warnings.simplefilter("ignore", UserWarning)
        required = set(
            get_peft_model_state_dict(peft_model, adapter_name=adapter_name, save_embedding_layers=False)
        )
        optional = set(
            get_peft_model_state_dict(peft_model, adapter_name=adapter_name, save_embedding_layers=True)
        )
    unused = sorted(in_file - required - optional)
    missing = sorted(required - in_file)
    parts = []
    if unused:
        parts.append(f"{len(unused)} weights unused (first: {unused[0]})")
    if missing:
        parts.append(f"{len(missing)} missing (first: {missing[0]})")
    return "; ".join(parts)
