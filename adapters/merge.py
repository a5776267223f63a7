"""Fold a LoRA adapter into its base model, streaming one tensor at a time.

`merge_into_base` asks `adapters.merge_plan` what to do (for every adapted weight: its factors,
scaling and checkpoint tensors; everything refusable is refused there), then walks the base
checkpoint's safetensors files tensor by tensor (`adapters.safetensors_io`): tensors without LoRA
are copied byte for byte; an adapted tensor is read, gets its delta added in float32, is rounded back
to its dtype and written. Peak memory is one tensor plus the delta of one adapted parameter (for a
fused expert tensor: all experts of that layer, in float32) plus the adapter, whatever the size of
the model. The merged model has exactly the base's keys, shapes, dtypes and (by default) sharding,
the base's config / tokenizer files and a model card; it is written atomically
(`adapters.output_folder`). It returns a `MergeReport`; `verify=True` adds `verify_merge`'s check
(`adapters.merge_verify`). Combining adapters lives in `adapters.combine`.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapters.combine import combine_adapters  # noqa: F401  (the old import path of combine_adapters)
from adapters.errors import MoetuneError
from adapters.hub import PICKLE_SUFFIXES
from adapters.merge_plan import delta_pieces, plan_merge
from adapters.merge_verify import VerifyReport, verify_merge
from adapters.output_folder import atomic_output_folder, check_new_output
from adapters.safetensors_io import DTYPES, INDEX_FILE, Checkpoint, ShardWriter, parse_size, write_index

__all__ = ["MergeReport", "combine_adapters", "merge_into_base", "parse_size", "verify_merge"]


@dataclass
class MergeReport:
    """What `merge_into_base` did; `str()` is the summary `moetune merge` prints."""

    base: Path
    adapter: Path
    output: Path
    parameters: dict[str, int]  # kind of weight ("attention", "routed experts", ...) -> adapted parameters
    full_tensors: int  # tensors of fully trained modules written in place of the base's
    experts: int  # experts per fused expert tensor (1: none)
    files: int  # safetensors files written
    bytes: int  # their tensor bytes
    side_files: list[str]  # config, tokenizer, ... copied from the base
    rounding: Rounding
    verify: VerifyReport | None = None

    def adapted(self) -> str:
        """'attention 4, routed experts 2; fused expert tensors of 8 experts, merged per expert'."""
        text = ", ".join(f"{kind} {n}" for kind, n in sorted(self.parameters.items()))
        if self.full_tensors:
            text += f"; {self.full_tensors} tensors of fully trained modules written in place"
        if self.experts > 1:
            text += f"; fused expert tensors of {self.experts} experts, merged per expert"
        return text

    def __str__(self) -> str:
        side = ", ".join(self.side_files) or "no side files"
        lines = [
            f"merged {self.adapter} into {self.base} -> {self.output}",
            f"  LoRA folded into {sum(self.parameters.values())} parameters: {self.adapted()}",
            f"  wrote {self.files} safetensors file(s), {self.bytes / 1e6:.1f} MB, plus {side} and README.md",
            f"  {self.rounding.describe()}",
        ]
        if self.verify is not None:
            lines.append(f"  {self.verify}")
        return "\n".join(lines)


def merge_into_base(
    base_folder: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    verify: bool = False,
    tolerance: float | None = None,
    max_shard_size: str | int | None = None,
) -> MergeReport:
    """Write base + adapter as a full model folder at `output`; return what was done (with the rounding).

    Streaming: one tensor in memory at a time (plus one parameter's delta). The output keeps the base's
    keys, dtypes and sharding (or re-shards to `max_shard_size`), copies config / tokenizer /
    generation files, and gets a model card. `verify` then runs `verify_merge` on the result.
    """
    base, adapter, out = Path(base_folder), Path(adapter_dir), Path(output)
    check_new_output(out)  # before the work, not only at the end
    checkpoint = Checkpoint(base)
    plan = plan_merge(base, adapter, checkpoint, max_shard_size)
    pending: dict[str, torch.Tensor] = {}  # delta pieces computed but not written yet
    rounding = Rounding()
    with atomic_output_folder(out) as tmp:
        weight_map, total = {}, 0
        for file_name, keys in plan.shards:
            with ShardWriter(tmp / file_name, [(k, checkpoint.entries[k]) for k in keys]) as writer:
                for key in keys:
                    target = plan.owner.get(key)
                    if key in plan.replaced:  # a module trained in full: its tensor replaces the base's
                        writer.write_tensor(plan.replaced[key].to(checkpoint.read(key).dtype))
                    elif target is None:
                        writer.copy_bytes(checkpoint.entries[key])
                    else:
                        if key not in pending:
                            pending.update(delta_pieces(target, plan.base_meta))
                        writer.write_tensor(_merged(checkpoint, key, pending.pop(key), rounding))
            weight_map.update(dict.fromkeys(keys, file_name))
            total += writer.size
        if len(plan.shards) > 1 or (checkpoint.indexed and max_shard_size is None):
            write_index(
                tmp, weight_map, {**checkpoint.metadata, "total_size": total}
            )  # e.g. total_parameters
        report = MergeReport(
            base=base,
            adapter=adapter,
            output=out,
            parameters=_count_kinds(t.model_key for t in plan.targets),
            full_tensors=len(plan.replaced),
            experts=max(t.factors.num_experts for t in plan.targets),
            files=len(plan.shards),
            bytes=total,
            side_files=_copy_side_files(base, tmp),
            rounding=rounding,
        )
        _merged_card(tmp, out.name, base, adapter, plan.adapter_config, _card_details(report))
    if verify:
        try:
            report.verify = verify_merge(base, adapter, out, tolerance=tolerance, check=False)
        except MoetuneError as err:
            raise MoetuneError(f"the merged model was written to {out} but {err}") from err
    return report


def _merged(checkpoint: Checkpoint, key: str, delta: torch.Tensor, rounding: Rounding) -> torch.Tensor:
    """Base tensor `key` + its float32 delta, rounded back to the tensor's dtype."""
    weight = checkpoint.read(key)
    exact = weight.to(torch.promote_types(weight.dtype, torch.float32)) + delta
    merged = exact.to(weight.dtype)
    rounding.add(checkpoint.entries[key].dtype, weight, delta, merged, exact)
    return merged


def _card_details(report: MergeReport) -> str:
    rounding = report.rounding.describe()
    return (
        "## Merge details\n\n"
        f"Merged with `moetune merge` from the adapter `{report.adapter.name}`: LoRA folded into "
        f"{sum(report.parameters.values())} parameters ({report.adapted()}). {rounding[0].upper()}{rounding[1:]}.\n"
    )


def _count_kinds(keys) -> dict[str, int]:
    counts: dict[str, int] = {}
    for key in keys:
        counts[_kind(key)] = counts.get(_kind(key), 0) + 1
    return counts


def _kind(key: str) -> str:
    if "shared_expert" in key:
        return "shared experts"
    if "expert" in key:
        return "routed experts"
    if re.search(r"(\.gate\.|router)", key):
        return "routers"
    if re.search(r"(attn|attention)", key):
        return "attention"
    if re.search(r"(mlp|feed_forward|ffn)", key):
        return "dense MLP"
    return "other"


@dataclass
class Rounding:
    """What rounding the merged weights back to 16 bits loses."""

    max_error: float = 0.0  # max |rounded - exact|
    max_change: float = 0.0  # max |delta|
    changed: int = 0
    lost: int = 0  # weights whose delta vanished entirely in the rounding
    dtypes: set[str] = field(default_factory=set)  # safetensors dtypes of the merged weights

    def add(
        self, dtype: str, base: torch.Tensor, delta: torch.Tensor, merged: torch.Tensor, exact: torch.Tensor
    ) -> None:
        self.dtypes.add(dtype)
        self.max_change = max(self.max_change, delta.abs().max().item())
        if base.dtype == torch.float32 or base.dtype == torch.float64:
            return
        self.max_error = max(self.max_error, (merged.float() - exact).abs().max().item())
        nonzero = delta != 0
        self.changed += int(nonzero.sum())
        self.lost += int((nonzero & (merged == base)).sum())

    def describe(self) -> str:
        """One sentence on what the rounding to the weights' dtype lost."""
        dtypes = self.dtypes
        names = ", ".join(str(DTYPES[d]).removeprefix("torch.") for d in sorted(dtypes))
        if not dtypes - {"F32", "F64"}:
            return f"weights are {names}: the merge adds in float32 and rounds nothing further"
        share = self.lost / self.changed if self.changed else 0.0
        return (
            f"weights are {names}: rounding the merged weights to it changes them by up to {self.max_error:.3g} "
            f"(the largest LoRA change is {self.max_change:.3g}); for {share:.1%} of the changed weights the "
            f"change was smaller than {names} can represent and was lost entirely"
        )


def _copy_side_files(base: Path, out: Path) -> list[str]:
    """Copy config, tokenizer, generation config, ... (every non-weight file but the card).

    Sub-folders without weight files are copied too: a processor keeps its extra tokenizers there
    (the multimodal processor's `text_encoder_tokenizer/`; without it transformers falls back to the
    root tokenizer with a deprecation warning). Folders holding weights (e.g. `original/`) are not.
    """
    copied = []
    for path in sorted(base.iterdir()):
        name = path.name
        if name.startswith(".") or name in ("README.md", INDEX_FILE):
            continue
        if path.is_dir():
            inside = [p for p in path.rglob("*") if p.is_file()]
            if inside and not any(_is_weight_file(p) for p in inside):
                shutil.copytree(path, out / name)
                copied.append(f"{name}/")
            continue
        if not path.is_file() or _is_weight_file(path):
            continue
        shutil.copy2(path, out / name)
        copied.append(name)
    return copied


def _is_weight_file(path: Path) -> bool:
    return path.name.endswith(".safetensors") or path.suffix in PICKLE_SUFFIXES


def _base_model_id(base: Path, adapter_config: dict) -> str:
    """The Hub id of the base when known (adapter config or a Hub cache path), else the folder path."""
    from adapters.model_card import is_hub_id

    named = adapter_config.get("base_model_name_or_path")
    if is_hub_id(named):
        return named
    match = re.search(r"models--([^/]+?)--([^/]+)/snapshots/", base.resolve().as_posix() + "/")
    if match:
        return f"{match.group(1)}/{match.group(2)}"
    return str(base)


def _merged_card(
    folder: Path, title: str, base: Path, adapter: Path, adapter_config: dict, details: str
) -> None:
    from adapters.model_card import read_card_metadata, write_model_card

    card = read_card_metadata(adapter / "README.md")
    recipe = next(
        (adapter / n for n in ("recipe.yaml", "recipe.yml", "recipe.json") if (adapter / n).is_file()), None
    )
    images = sorted(adapter.glob("*expert*.png")) + sorted(adapter.glob("*/*expert*.png"))
    write_model_card(
        folder,
        base_model=_base_model_id(base, adapter_config),
        kind="merged",
        datasets=card.get("datasets") or (),
        metrics=adapter / "metrics.json" if (adapter / "metrics.json").is_file() else {},
        recipe=recipe,
        images=images,
        license=card.get("license"),
        details=details,
        title=title,
    )
