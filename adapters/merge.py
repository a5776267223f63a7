"""Fold a LoRA adapter into its base model, streaming one tensor at a time; check a merge; combine adapters.

`merge_into_base` never loads the model. It builds the architecture on the meta device (no memory),
lets PEFT attach the adapter's config there, and so learns, for every adapted weight, exactly what
PEFT would do: the parameter, its shape, the layout of the LoRA factors, the scaling. Then it walks
the base checkpoint's safetensors files tensor by tensor: tensors without LoRA are copied byte for
byte; an adapted tensor is read, gets its delta added in float32, is rounded back to its dtype and
written. Peak memory is one tensor plus the delta of one adapted parameter (for a fused expert
tensor: all experts of that layer, in float32) plus the adapter, whatever the size of the model.

Checkpoints whose file layout differs from the model's (transformers v5 keeps routed experts fused
in memory, (E, 2I, H), but saves per-expert tensors `experts.N.gate_proj.weight`, and Mixtral renames
`mlp` to `block_sparse_moe`) are handled by transformers' own reverse conversion
(`revert_weight_conversion`), applied to the delta: the merged model has exactly the base's keys,
shapes, dtypes and (by default) sharding.

`verify_merge` loads base + adapter (PEFT) and the merged model and compares logits. Combining
adapters lives in `adapters.combine` and is re-exported here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from adapters.combine import combine_adapters
from adapters.errors import MoetuneError
from adapters.hub import PICKLE_SUFFIXES
from adapters.output_folder import atomic_output_folder, check_new_output
from adapters.peft_format import (
    SAVED_PREFIX,
    LoraPair,
    group_factors,
    read_adapter,
    read_adapter_config,
    trained_whole,
)
from adapters.provenance import check_base

__all__ = ["combine_adapters", "merge_into_base", "verify_merge"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# safetensors dtype names <-> torch dtypes (the float ones can be merged into).
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
MERGEABLE = {"F64", "F32", "F16", "BF16"}
# Default verify tolerance on the max |logit difference|, as a share of the largest |logit| (at least 1),
# by the dtype of the merged weights. verify runs in float32, so what shows is the merge's own error:
# nothing for float32 weights but summation order, for 16-bit weights the rounding of the merged weights
# (measured ~0.3% of the largest logit for bfloat16 on the test models).
DEFAULT_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
_COPY_CHUNK = 64 << 20


# ----------------------------------------------------------------------------- safetensors files


@dataclass
class _Entry:
    file: Path
    dtype: str
    shape: list[int]
    start: int  # absolute byte offsets in `file`
    end: int


def _read_header(path: Path) -> dict[str, _Entry]:
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100_000_000:  # safetensors caps headers at 100 MB: this is not one
                raise ValueError(f"header size {size} is not plausible")
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as err:
        raise MoetuneError(f"{path} is not a readable safetensors file: {err}") from err
    header.pop("__metadata__", None)
    base = 8 + size
    return {
        name: _Entry(
            path,
            info["dtype"],
            list(info["shape"]),
            base + info["data_offsets"][0],
            base + info["data_offsets"][1],
        )
        for name, info in header.items()
    }


class _Checkpoint:
    """The safetensors weights of a model folder: every tensor's file, dtype, shape and byte range."""

    def __init__(self, folder: Path) -> None:
        if not folder.is_dir():
            raise MoetuneError(f"base model folder {folder} does not exist")
        index = folder / INDEX_FILE
        self.metadata: dict = {}  # the index's metadata (total_size, total_parameters, ...)
        if index.is_file():
            try:
                index_json = json.loads(index.read_text())
                weight_map, self.metadata = index_json["weight_map"], dict(index_json.get("metadata") or {})
            except (OSError, ValueError, KeyError, AttributeError) as err:
                raise MoetuneError(f"{index} is not a valid safetensors index: {err}") from err
            files = list(dict.fromkeys(weight_map.values()))
        elif (folder / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            hint = f"; it has {pickles[0]}, a pickle file, which moetune does not load (convert it to safetensors)"
            raise MoetuneError(
                f"{folder} has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}){hint if pickles else ''}"
            )
        self.folder, self.files, self.indexed = folder, files, index.is_file()
        self.entries: dict[str, _Entry] = {}
        for name in files:
            if not (folder / name).is_file():
                raise MoetuneError(f"{folder}: the index names {name}, which is missing")
            for key, entry in sorted(_read_header(folder / name).items(), key=lambda kv: kv[1].start):
                self.entries[key] = entry

    def read(self, key: str) -> torch.Tensor:
        entry = self.entries[key]
        buf = bytearray(entry.end - entry.start)
        with open(entry.file, "rb") as f:
            f.seek(entry.start)
            f.readinto(buf)
        return torch.frombuffer(buf, dtype=DTYPES[entry.dtype]).reshape(entry.shape)


class _ShardWriter:
    """Writes one safetensors file tensor by tensor (the header is known up front: shapes do not change)."""

    def __init__(self, path: Path, entries: list[tuple[str, _Entry]]) -> None:
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key, entry in entries:
            size = entry.end - entry.start
            header[key] = {
                "dtype": entry.dtype,
                "shape": entry.shape,
                "data_offsets": [offset, offset + size],
            }
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.size = offset
        self.file = open(path, "wb")  # noqa: SIM115  (closed in close())
        self.file.write(struct.pack("<Q", len(raw)) + raw)

    def write_tensor(self, tensor: torch.Tensor) -> None:
        self.file.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)

    def copy_bytes(self, entry: _Entry) -> None:
        with open(entry.file, "rb") as f:
            f.seek(entry.start)
            left = entry.end - entry.start
            while left:
                chunk = f.read(min(left, _COPY_CHUNK))
                if not chunk:
                    raise MoetuneError(f"{entry.file} is truncated")
                self.file.write(chunk)
                left -= len(chunk)

    def close(self) -> None:  # fsynced with the whole folder (adapters.output_folder)
        self.file.close()


def parse_size(value: str | int) -> int:
    """ "2GB" / "500MB" / "1.5GiB" / 10**9 -> bytes."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(I?B)?\s*", str(value).upper())
    if not match:
        raise MoetuneError(f"--max-shard-size '{value}' is not a size; write e.g. 2GB, 500MB or 1GiB")
    number, unit, suffix = float(match.group(1)), match.group(2), match.group(3) or "B"
    base = 1024 if suffix == "IB" else 1000
    size = int(number * base ** " KMGT".index(unit or " "))
    if size <= 0:
        raise MoetuneError(f"--max-shard-size must be positive; got '{value}'")
    return size


# ----------------------------------------------------------------------------- what to merge where


@dataclass
class _Target:
    """One adapted parameter of the model and where its pieces live in the checkpoint."""

    model_key: str  # e.g. "model.layers.1.mlp.experts.gate_up_proj"
    factors: LoraPair
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


def _short(err: BaseException) -> str:
    return " ".join(str(err).split())[:300]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers / peft info, warnings and progress bars (they are not the user's business here)."""
    import warnings

    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            # PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing`: their warning, not ours
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _meta_model(base: Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(base, trust_remote_code=False, local_files_only=True)
    except Exception as err:
        raise MoetuneError(
            f"cannot read the architecture of {base} from config.json ({_short(err)}); is it a model folder? "
            "(moetune's built-in architecture is registered by the moetune CLI)"
        ) from err
    try:
        with _quiet(), torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as err:
        raise MoetuneError(f"cannot build the architecture of {base} ({_short(err)})") from err


MERGE_HANDLES = ("modules_to_save",)  # adapter features merge_into_base handles beyond plain LoRA


def _plan(
    base: Path, adapter_dir: Path, checkpoint: _Checkpoint, check: bool = True
) -> tuple[list[_Target], object]:
    """The adapted parameters, each with its checkpoint keys; and the meta base model (for conversions).

    check: compare the adapter's recorded base with `base` first (`adapters.provenance.check_base`)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora.layer import Conv2d as LoraConv2d
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper
    from transformers.core_model_loading import revert_weight_conversion

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
            f"{adapter_dir}/adapter_config.json is not a LoRA config PEFT reads: {_short(err)}"
        ) from err
    lora_config.inference_mode = True
    base_meta, peft_meta = _meta_model(base), _meta_model(base)
    if check:
        check_base(adapter_dir, read_adapter_config(adapter_dir, allow=MERGE_HANDLES), base_meta, str(base))
    try:
        with _quiet():
            inject_adapter_in_model(lora_config, peft_meta, adapter_name="default", low_cpu_mem_usage=True)
    except (ValueError, TypeError, KeyError, RuntimeError) as err:
        raise MoetuneError(f"adapter {adapter_dir} does not fit base {base}: {_short(err)}") from err

    targets: list[_Target] = []
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
        targets.append(_Target(model_key, factors, shape, out_in))
    if saved:
        extra = next(iter(saved)).removeprefix(SAVED_PREFIX)
        raise MoetuneError(
            f"adapter {adapter_dir} has LoRA weights for {extra}, which {base} does not have (an adapter for another base?)"
        )
    if not targets:
        raise MoetuneError(f"adapter {adapter_dir} adapts nothing in {base}")

    for target in targets:
        entry = checkpoint.entries.get(target.model_key)
        if entry is not None and tuple(entry.shape) == target.param_shape:
            target.disk_keys = [target.model_key]
        else:  # the checkpoint stores it differently (per-expert tensors, renamed modules)
            probe = {target.model_key: torch.empty(target.param_shape, device="meta")}
            with _quiet():
                pieces = revert_weight_conversion(base_meta, probe)
            for disk_key, piece in pieces.items():
                entry = checkpoint.entries.get(disk_key)
                if entry is None or tuple(entry.shape) != tuple(piece.shape):
                    found = "missing" if entry is None else f"of shape {tuple(entry.shape)}"
                    raise MoetuneError(
                        f"{base} has no weight for {target.model_key} (looked for {disk_key} {tuple(piece.shape)}: "
                        f"{found}); is this the base the adapter was trained on?"
                    )
            target.disk_keys = list(pieces)
        for disk_key in target.disk_keys:
            dtype = checkpoint.entries[disk_key].dtype
            if dtype not in MERGEABLE:
                raise MoetuneError(
                    f"{base}: {disk_key} is stored as {dtype} (quantised); merge into a float16 / bfloat16 / "
                    "float32 copy of the base instead"
                )
    return targets, base_meta


def _delta_pieces(target: _Target, base_meta) -> dict[str, torch.Tensor]:
    """{checkpoint key: float32 delta} of one target (one tensor, or per-expert pieces)."""
    from transformers.core_model_loading import revert_weight_conversion

    delta = target.delta()
    if target.disk_keys == [target.model_key]:
        return {target.model_key: delta}
    with _quiet():
        return dict(revert_weight_conversion(base_meta, {target.model_key: delta}))


# ----------------------------------------------------------------------------- the merge


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
class _Rounding:
    """What rounding the merged weights back to 16 bits loses."""

    max_error: float = 0.0  # max |rounded - exact|
    max_change: float = 0.0  # max |delta|
    changed: int = 0
    lost: int = 0  # weights whose delta vanished entirely in the rounding

    def add(self, base: torch.Tensor, delta: torch.Tensor, merged: torch.Tensor, exact: torch.Tensor) -> None:
        self.max_change = max(self.max_change, delta.abs().max().item())
        if base.dtype == torch.float32 or base.dtype == torch.float64:
            return
        self.max_error = max(self.max_error, (merged.float() - exact).abs().max().item())
        nonzero = delta != 0
        self.changed += int(nonzero.sum())
        self.lost += int((nonzero & (merged == base)).sum())

    def report(self, dtypes: set[str]) -> str:
        names = ", ".join(str(DTYPES[d]).removeprefix("torch.") for d in sorted(dtypes))
        if not dtypes - {"F32", "F64"}:
            return f"weights are {names}: the merge adds in float32 and rounds nothing further"
        share = self.lost / self.changed if self.changed else 0.0
        return (
            f"weights are {names}: rounding the merged weights to it changes them by up to {self.max_error:.3g} "
            f"(the largest LoRA change is {self.max_change:.3g}); for {share:.1%} of the changed weights the "
            f"change was smaller than {names} can represent and was lost entirely"
        )


def _output_plan(checkpoint: _Checkpoint, max_shard_size) -> list[tuple[str, list[str]]]:
    """[(file name, keys in order)] of the merged checkpoint."""
    keys = list(checkpoint.entries)
    if max_shard_size is None:
        by_file: dict[str, list[str]] = {name: [] for name in checkpoint.files}
        for key in keys:
            by_file[checkpoint.entries[key].file.name].append(key)
        return [(name, ks) for name, ks in by_file.items() if ks]
    limit = parse_size(max_shard_size)
    groups: list[list[str]] = [[]]
    size = 0
    for key in keys:
        n = checkpoint.entries[key].end - checkpoint.entries[key].start
        if groups[-1] and size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += n
    if len(groups) == 1:
        return [(SINGLE_FILE, groups[0])]
    total = len(groups)
    return [(f"model-{i + 1:05d}-of-{total:05d}.safetensors", g) for i, g in enumerate(groups)]


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


def _replacements(adapter: Path, checkpoint: _Checkpoint) -> dict[str, torch.Tensor]:
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


def _refuse_quantized_base(base: Path) -> None:
    """A merge adds B A to the float weights: a folder whose weights are stored quantized cannot take it."""
    try:
        config = json.loads((base / "config.json").read_text())
    except (OSError, ValueError):
        return  # _Checkpoint names what is wrong with the folder
    quantization = config.get("quantization_config") or (config.get("text_config") or {}).get(
        "quantization_config"
    )
    if quantization:
        method = quantization.get("method") or quantization.get("quant_method", "quantized")
        raise MoetuneError(
            f"{base} stores its weights quantized ({method}); merge needs the full-precision base: pass the "
            f"float model the quantized one was made from (the adapter is an adapter of that model too)"
        )


def merge_into_base(
    base_folder: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    verify: bool = False,
    tolerance: float | None = None,
    max_shard_size: str | int | None = None,
) -> str:
    """Write base + adapter as a full model folder at `output`; return a report (with the bf16 rounding).

    Streaming: one tensor in memory at a time (plus one parameter's delta). The output keeps the base's
    keys, dtypes and sharding (or re-shards to `max_shard_size`), copies config / tokenizer /
    generation files, and gets a model card. `verify` then runs `verify_merge` on the result.
    """
    base, adapter, out = Path(base_folder), Path(adapter_dir), Path(output)
    check_new_output(out)  # before the work, not only at the end
    _refuse_quantized_base(base)
    checkpoint = _Checkpoint(base)
    adapter_config = read_adapter_config(adapter, allow=MERGE_HANDLES)
    targets, base_meta = _plan(base, adapter, checkpoint)
    plan = _output_plan(checkpoint, max_shard_size)
    replaced = _replacements(adapter, checkpoint)

    owner: dict[str, _Target] = {}
    for target in targets:
        for key in target.disk_keys:
            if key in owner:  # two LoRA layers on one weight: PEFT would add both, moetune refuses to guess
                raise MoetuneError(
                    f"{adapter} adapts {key} twice ({owner[key].model_key}, {target.model_key})"
                )
            owner[key] = target
    pending: dict[str, torch.Tensor] = {}  # delta pieces computed but not written yet
    rounding, dtypes = _Rounding(), set()
    with atomic_output_folder(out) as tmp:
        weight_map, total = {}, 0
        for file_name, keys in plan:
            writer = _ShardWriter(tmp / file_name, [(k, checkpoint.entries[k]) for k in keys])
            try:
                for key in keys:
                    entry = checkpoint.entries[key]
                    target = owner.get(key)
                    if key in replaced:  # a module trained in full: its tensor replaces the base's
                        writer.write_tensor(replaced[key].to(checkpoint.read(key).dtype))
                        continue
                    if target is None:
                        writer.copy_bytes(entry)
                        continue
                    if key not in pending:
                        pending.update(_delta_pieces(target, base_meta))
                    delta = pending.pop(key)
                    weight = checkpoint.read(key)
                    exact = weight.to(torch.promote_types(weight.dtype, torch.float32)) + delta
                    merged = exact.to(weight.dtype)
                    rounding.add(weight, delta, merged, exact)
                    dtypes.add(entry.dtype)
                    writer.write_tensor(merged)
                    del weight, exact, merged, delta
            finally:
                writer.close()
            weight_map.update(dict.fromkeys(keys, file_name))
            total += writer.size
        if len(plan) > 1 or (checkpoint.indexed and max_shard_size is None):
            metadata = {**checkpoint.metadata, "total_size": total}  # e.g. total_parameters: unchanged
            index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        side_files = _copy_side_files(base, tmp)

        counts: dict[str, int] = {}
        for target in targets:
            kind = _kind(target.model_key)
            counts[kind] = counts.get(kind, 0) + 1
        experts = max(t.factors.num_experts for t in targets)
        summary = ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items()))
        if replaced:
            summary += f"; {len(replaced)} tensors of fully trained modules written in place"
        if experts > 1:
            summary += f"; fused expert tensors of {experts} experts, merged per expert"
        rounding_line = rounding.report(dtypes)
        details = (
            "## Merge details\n\n"
            f"Merged with `moetune merge` from the adapter `{adapter.name}`: LoRA folded into {len(targets)} "
            f"parameters ({summary}). {rounding_line[0].upper()}"
            f"{rounding_line[1:]}.\n"
        )
        _merged_card(tmp, out.name, base, adapter, adapter_config, details)

    report = [
        f"merged {adapter} into {base} -> {out}",
        f"  LoRA folded into {len(targets)} parameters: {summary}",
        f"  wrote {len(plan)} safetensors file(s), {total / 1e6:.1f} MB, plus {', '.join(side_files) or 'no side files'}"
        " and README.md",
        f"  {rounding_line}",
    ]
    if verify:
        try:
            report.append("  " + verify_merge(base, adapter, out, tolerance=tolerance, check=False))
        except MoetuneError as err:
            raise MoetuneError(f"the merged model was written to {out} but {err}") from err
    return "\n".join(report)


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


# ----------------------------------------------------------------------------- verification


def _float_dtype(folder: Path) -> torch.dtype:
    """The dtype most floating-point bytes of a checkpoint are stored in."""
    sizes: dict[str, int] = {}
    for entry in _Checkpoint(folder).entries.values():
        if entry.dtype in MERGEABLE:
            sizes[entry.dtype] = sizes.get(entry.dtype, 0) + entry.end - entry.start
    return DTYPES[max(sizes, key=sizes.get)] if sizes else torch.float32


def verify_merge(
    base_folder: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    merged_folder: str | os.PathLike,
    *,
    tolerance: float | None = None,
    batches: int = 3,
    batch_size: int = 2,
    length: int = 32,
    check: bool = True,
) -> str:
    """Compare logits of base + adapter (PEFT, unmerged) and the merged model on fixed random batches.

    Both models are loaded whole on the CPU and run in float32 (16-bit weights are upcast exactly), so
    the difference is the merge's own error, not 16-bit arithmetic noise. Raises MoetuneError when the
    max |logit difference| exceeds `tolerance` (absolute; default: a share of the largest |logit|, at
    least 1, by the merged weights' dtype: float32 1e-4, float16 5e-3, bfloat16 2e-2); returns a
    one-line report otherwise. check: compare the adapter's recorded base with `base_folder` first
    (`adapters.provenance.check_base`; `merge --verify` has done it already).
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter, merged_path = Path(base_folder), Path(adapter_dir), Path(merged_folder)
    _refuse_quantized_base(base)
    weights = _float_dtype(merged_path)

    def load(folder: Path):
        try:
            with _quiet():
                return AutoModelForCausalLM.from_pretrained(
                    folder,
                    dtype=torch.float32,
                    use_safetensors=True,
                    trust_remote_code=False,
                    local_files_only=True,
                ).eval()
        except Exception as err:
            raise MoetuneError(f"cannot load {folder} as a model: {_short(err)}") from err

    adapter_config = read_adapter_config(adapter, allow=MERGE_HANDLES)  # clear errors for a bad folder
    base_model = load(base)
    if check:
        check_base(adapter, adapter_config, base_model, str(base))
    try:
        with _quiet():
            reference = PeftModel.from_pretrained(base_model, str(adapter)).eval()
    except Exception as err:
        raise MoetuneError(f"PEFT cannot load adapter {adapter} on {base}: {_short(err)}") from err
    merged = load(merged_path)
    vocab = merged.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(0)
    worst, scale = torch.tensor(0.0), torch.tensor(0.0)
    with torch.no_grad():
        for _ in range(batches):
            ids = torch.randint(0, vocab, (batch_size, length), generator=gen)
            expected = reference(input_ids=ids).logits
            worst = torch.maximum(worst, (expected - merged(input_ids=ids).logits).abs().max())  # NaN stays
            scale = torch.maximum(scale, expected.abs().max())
    worst, scale = worst.item(), scale.item()
    name = str(weights).removeprefix("torch.")
    if tolerance is None:
        share = DEFAULT_TOLERANCE.get(weights, 1e-4)
        tol, how = (
            share * max(1.0, scale),
            f"{share:g} x max(1, largest |logit|), the default for {name} weights",
        )
    else:
        tol, how = float(tolerance), "given"
    what = (
        f"max |logit difference| {worst:.3g} (logits up to {scale:.3g}) over {batches} batches of "
        f"{batch_size}x{length} tokens in float32, {name} weights; tolerance {tol:.3g} ({how})"
    )
    if not worst <= tol:  # also catches NaN
        raise MoetuneError(f"verify-merge failed: {what}; the merged model does not equal base + adapter")
    return f"verify-merge passed: {what}"
