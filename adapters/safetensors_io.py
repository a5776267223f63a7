"""Streaming safetensors I/O: read a checkpoint tensor by tensor, write shards tensor by tensor.

A merge must never hold a model in memory, so neither side goes through `safetensors.torch.load_file`
/ `save_file` (a whole file at once). A safetensors file is an 8-byte header length, a JSON header
(dtype, shape and byte range of every tensor) and the raw bytes; `Checkpoint` reads the headers of
a model folder (one file, or shards named by `model.safetensors.index.json`) and then any one
tensor's bytes, and `ShardWriter` writes the header first (shapes and dtypes are known up front)
and then each tensor, or a byte-for-byte copy of an unchanged one, as it comes.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.errors import MoetuneError
from adapters.hub import PICKLE_SUFFIXES

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# safetensors dtype names <-> torch dtypes (the float ones can be merged into).
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
MERGEABLE = {"F64", "F32", "F16", "BF16"}
_COPY_CHUNK = 64 << 20


@dataclass
class TensorEntry:
    """Where one tensor of a checkpoint lives: its file, dtype, shape and absolute byte range."""

    file: Path
    dtype: str
    shape: list[int]
    start: int  # absolute byte offsets in `file`
    end: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """{tensor name: TensorEntry} from a safetensors file's header, without reading any tensor."""
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
        name: TensorEntry(
            path,
            info["dtype"],
            list(info["shape"]),
            base + info["data_offsets"][0],
            base + info["data_offsets"][1],
        )
        for name, info in header.items()
    }


class Checkpoint:
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
        self.entries: dict[str, TensorEntry] = {}
        for name in files:
            if not (folder / name).is_file():
                raise MoetuneError(f"{folder}: the index names {name}, which is missing")
            for key, entry in sorted(read_header(folder / name).items(), key=lambda kv: kv[1].start):
                self.entries[key] = entry

    def read(self, key: str) -> torch.Tensor:
        """One tensor, read from its byte range alone."""
        entry = self.entries[key]
        buf = bytearray(entry.end - entry.start)
        with open(entry.file, "rb") as f:
            f.seek(entry.start)
            f.readinto(buf)
        return torch.frombuffer(buf, dtype=DTYPES[entry.dtype]).reshape(entry.shape)


class ShardWriter:
    """Writes one safetensors file tensor by tensor (the header is known up front: shapes do not change)."""

    def __init__(self, path: Path, entries: list[tuple[str, TensorEntry]]) -> None:
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

    def copy_bytes(self, entry: TensorEntry) -> None:
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

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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


def shard_plan(checkpoint: Checkpoint, max_shard_size: str | int | None) -> list[tuple[str, list[str]]]:
    """[(file name, keys in order)] of a copy of `checkpoint`: its own files, or re-sharded to a size."""
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


def write_index(folder: Path, weight_map: dict[str, str], metadata: dict) -> None:
    """model.safetensors.index.json for shards written into `folder`."""
    index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def float_dtype(folder: Path) -> torch.dtype:
    """The dtype most floating-point bytes of a checkpoint are stored in."""
    sizes: dict[str, int] = {}
    for entry in Checkpoint(folder).entries.values():
        if entry.dtype in MERGEABLE:
            sizes[entry.dtype] = sizes.get(entry.dtype, 0) + entry.end - entry.start
    return DTYPES[max(sizes, key=sizes.get)] if sizes else torch.float32
