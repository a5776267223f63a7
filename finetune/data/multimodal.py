"""Multimodal records -> model inputs: checking media, resampling, batching mixed modality sets.

A record is one JSON object (a jsonl line, a json list item, a parquet row) with any subset of
    {"image": path, "audio": path, "text": str, "target": str, "labels": [str | int, ...]}
(the field names are `data.image_field`, `audio_field`, `text_field`, `target_field`, `labels_field`;
relative paths are looked up next to the data file, then in the working directory). What each feeds:
- `image` -> the image processor (resize to the encoder's size, normalise) -> `pixel_values`;
- `audio` (wav / flac / anything libsndfile reads) -> mono (channels averaged) -> resampled to the feature
  extractor's rate with a windowed-sinc filter (never read at the wrong rate) -> `input_values`;
- `text` -> the text encoder (when the model has one) and, for records with a target, the decoder prompt;
- `target` -> the decoder continuation, loss on its tokens only: [bos] prompt | target [eos];
- `labels` -> a multi-hot vector over the label names for the classification head.

Bad media: every image / audio file is opened when the dataset is built (decoded in full by default). A
missing or unreadable file is reported as `SOURCE: record N: ...` and, as `data.on_bad_record` says
(fail / skip), stops with that one line or is skipped with a warning (and counted). A file that breaks
after the check gets the same treatment when read (a skipped one is replaced by the next good record),
so the collator only ever sees good examples.

Two entry points build datasets:
- `build_multimodal_dataset(raw, data, processor, source=...)`: one split of raw records already loaded by
  `finetune.data` (the recipe pipeline: sources, hold-out and caps are done there);
- `build_multimodal_data(data, processor, seed=...)`: the whole thing from a data section (files or
  `synthetic:KIND[:N[:SEED]]` sources, see `synthetic_mm.py`), for scripts and the evidence benchmark.
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from finetune.errors import MoetuneError
from finetune.modeling import multimodal as _mm
from finetune.modeling.media import MediaError, load_audio, load_image, resample

from . import synthetic_mm

if TYPE_CHECKING:
    from finetune.recipe import DataSection

logger = logging.getLogger("moetune.data")

MEDIA = ("image", "audio")


# ----------------------------------------------------------------------------- options


@dataclass
class MultimodalOptions:
    """How records are read. The first group comes from the recipe's data section; the rest are extra
    settings a script can pass under `data["multimodal"]` (all have defaults).

    on_bad_record: "fail" (stop with the file and record number) or "skip" (warn, count, drop the record).
    *_field: record keys of each input.
    verify_media: "full" (decode every file when the dataset is built), "header" (headers only) or "off".
    prompt: decoder prompt of records that have a target but no text.
    text_to_decoder: a record's `text` is also its decoder prompt (when it has a target).
    label_names: the classes of `labels`, in head order; default: the processor's, else the sorted
        labels of the first split built (and then kept on the processor for the other splits).
    audio_max_seconds: longer audio is cut to this length (counted and reported).
    cache_dir: where `synthetic:` data is generated (default $MOETUNE_CACHE or ~/.cache/moetune).
    ignore_modalities: inputs among image / audio / text to leave out of every record (ablations).
    """

    on_bad_record: str = "fail"
    image_field: str = "image"
    audio_field: str = "audio"
    text_field: str = "text"
    target_field: str = "target"
    labels_field: str = "labels"
    verify_media: str = "full"
    prompt: str = ""
    text_to_decoder: bool = True
    label_names: list[str] | None = None
    audio_max_seconds: float = 30.0
    cache_dir: str | None = None
    ignore_modalities: list[str] = field(default_factory=list)

    SECTION_KEYS = (
        "on_bad_record",
        "image_field",
        "audio_field",
        "text_field",
        "target_field",
        "labels_field",
    )

    @classmethod
    def from_section(cls, section: Any) -> MultimodalOptions:
        values = {k: _get(section, k) for k in cls.SECTION_KEYS if _get(section, k) is not None}
        extra = _get(section, "multimodal") or {}
        known = [f.name for f in fields(cls)]
        for key in extra:
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1)
                fix = f"did you mean '{hint[0]}'?" if hint else f"known keys: {', '.join(known)}"
                raise MoetuneError(f"data.multimodal.{key}: unknown key; {fix}")
        options = cls(**{**values, **dict(extra)})
        for key, allowed in {
            "on_bad_record": ("fail", "skip"),
            "verify_media": ("full", "header", "off"),
        }.items():
            if getattr(options, key) not in allowed:
                raise MoetuneError(
                    f"data.{key}: {getattr(options, key)!r} is not one of {', '.join(allowed)}"
                )
        for name in options.ignore_modalities:
            if name not in ("image", "audio", "text"):
                raise MoetuneError(
                    f"data.multimodal.ignore_modalities: {name!r} is not one of image, audio, text"
                )
        if options.label_names is not None:
            options.label_names = [str(n) for n in options.label_names]
        return options


def _get(section: Any, key: str, default: Any = None) -> Any:
    if section is None:
        return default
    if isinstance(section, Mapping):
        return section.get(key, default)
    return getattr(section, key, default)


# ----------------------------------------------------------------------------- records


@dataclass
class MultimodalRecord:
    where: str  # "SOURCE: record N", for messages
    image: Path | None = None
    audio: Path | None = None
    text: str | None = None
    target: str | None = None
    labels: list[str] | None = None


def parse_record(
    row: Any, where: str, options: MultimodalOptions, base_dirs: Sequence[Path]
) -> MultimodalRecord:
    """Type-check one raw record; a malformed one is a MoetuneError naming `where` and the field."""
    if not isinstance(row, Mapping):
        raise MoetuneError(
            f"{where}: a record must be a JSON object with image / audio / text / target / labels"
        )
    record = MultimodalRecord(where=where)
    ignored = set(options.ignore_modalities)
    for key in MEDIA:
        name = getattr(options, f"{key}_field")
        value = row.get(name)
        if value is None or value == "" or key in ignored:
            continue
        if not isinstance(value, str):
            raise MoetuneError(
                f"{where}: '{name}' must be a file path (a string), got {type(value).__name__}"
            )
        setattr(record, key, _locate(Path(value).expanduser(), base_dirs))
    for key in ("text", "target"):
        name = getattr(options, f"{key}_field")
        value = row.get(name)
        if value is not None and not isinstance(value, str):
            raise MoetuneError(f"{where}: '{name}' must be a string, got {type(value).__name__}")
        if key == "text" and "text" in ignored:
            value = None
        setattr(record, key, value)
    labels = row.get(options.labels_field)
    if labels is not None:
        if isinstance(labels, (str, int)):
            labels = [labels]
        if not isinstance(labels, Sequence) or not all(isinstance(x, (str, int)) for x in labels):
            raise MoetuneError(f"{where}: '{options.labels_field}' must be a list of strings or integers")
        record.labels = [str(x) for x in labels]
    if all(getattr(record, k) is None for k in ("image", "audio", "text", "target", "labels")):
        raise MoetuneError(f"{where}: the record has none of image / audio / text / target / labels")
    return record


def _locate(path: Path, base_dirs: Sequence[Path]) -> Path:
    """An absolute path as is; a relative one next to the data file first, then in the working directory."""
    if path.is_absolute():
        return path
    candidates = [d / path for d in base_dirs] + [Path.cwd() / path]
    return next((c for c in candidates if c.exists()), candidates[0])


def _base_dirs(source: str | None) -> list[Path]:
    dirs = []
    for part in (source or "").split(", "):
        p = Path(part)
        if p.is_file():
            dirs.append(p.parent)
        elif p.is_dir():
            dirs.append(p)
    return dirs


def read_records(path: str | Path, options: MultimodalOptions) -> list[MultimodalRecord]:
    """Parse a jsonl / json / parquet file (record N = the jsonl line number, else the 1-based row)."""
    path = Path(path)
    if not path.is_file():
        raise MoetuneError(f"{path}: no such data file; check data.train / data.eval")
    suffix = path.suffix.lower()
    rows: list[tuple[int, Any]] = []
    if suffix in (".jsonl", ".ndjson"):
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append((lineno, json.loads(line)))
                    except json.JSONDecodeError as err:
                        raise MoetuneError(
                            f"{path}: record {lineno}: not valid JSON ({err.msg}); fix or remove the line"
                        ) from err
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise MoetuneError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from err
        if not isinstance(data, list):
            raise MoetuneError(f"{path}: a .json data file must hold a list of records")
        rows = list(enumerate(data, 1))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = list(enumerate(pq.read_table(path).to_pylist(), 1))
    else:
        raise MoetuneError(f"{path}: multimodal data must be .jsonl, .json or .parquet")
    return [parse_record(row, f"{path}: record {n}", options, [path.parent]) for n, row in rows]


# ----------------------------------------------------------------------------- dataset


class MultimodalDataset(Dataset):
    """Checked records -> examples: decoder ids / labels, pixels, waveform, text-encoder ids, multi-hot labels.

    `skipped` lists the records dropped for bad media, `truncated` counts examples cut to max_length.
    """

    def __init__(
        self,
        records: list[MultimodalRecord],
        processor,
        options: MultimodalOptions,
        label_names: list[str],
        max_length: int | None = None,
    ) -> None:
        self.processor = processor
        self.options = options
        self.label_names = list(label_names)
        self.label_index = {name: i for i, name in enumerate(self.label_names)}
        self.max_length = max_length
        self.modalities = set(getattr(processor, "modalities", []) or [])
        self.truncated = 0
        self.audio_truncated = 0
        self.skipped: list[str] = []
        self.records = self._check(records)

    def _check(self, records: list[MultimodalRecord]) -> list[MultimodalRecord]:
        good = []
        for record in records:
            for key in MEDIA:
                if getattr(record, key) is not None and key not in self.modalities:
                    raise MoetuneError(
                        f"{record.where}: has an {key} but the model has no {key} encoder (modalities: "
                        f"{sorted(self.modalities)}); use a model built with --modalities including {key}"
                    )
            unknown = [x for x in record.labels or [] if x not in self.label_index]
            if unknown:
                raise MoetuneError(
                    f"{record.where}: labels {unknown} are not among the label names {self.label_names}"
                )
            if self.options.verify_media != "off":
                try:
                    self._media(record, verify=self.options.verify_media)
                except MediaError as err:
                    self._bad(record, err)
                    continue
            good.append(record)
        if self.skipped:
            logger.warning(
                "skipped %d of %d records with bad media (first: %s)",
                len(self.skipped),
                len(records),
                self.skipped[0],
            )
        if records and not good:
            raise MoetuneError(f"{records[0].where.rsplit(': record', 1)[0]}: no record with readable media")
        return good

    def _bad(self, record: MultimodalRecord, err: MediaError) -> None:
        message = f"{record.where}: {err}"
        if self.options.on_bad_record == "fail":
            raise MoetuneError(f"{message}; fix or remove the record, or set data.on_bad_record: skip")
        logger.warning("%s; skipped", message)
        self.skipped.append(message)

    def _media(self, record: MultimodalRecord, verify: str = "full") -> dict[str, Any]:
        out: dict[str, Any] = {}
        if record.image is not None:
            out["image"] = load_image(record.image, verify)
        if record.audio is not None:
            wave = load_audio(record.audio, self.processor.sampling_rate, verify)
            limit = int(self.options.audio_max_seconds * self.processor.sampling_rate)
            if wave is not None and wave.shape[0] > limit:
                wave = wave[:limit]
                out["audio_truncated"] = True
            out["audio"] = wave
        return out

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        for attempt in range(len(self.records)):
            record = self.records[(index + attempt) % len(self.records)]
            try:
                media = self._media(record)
            except MediaError as err:  # broke after the check: same policy, then the next record
                self._bad(record, err)
                continue
            return self._example(record, media)
        raise MoetuneError("no record with readable media left; check the data files")

    def _example(self, record: MultimodalRecord, media: dict[str, Any]) -> dict[str, Any]:
        processor = self.processor
        example: dict[str, Any] = {}
        if record.target is not None:
            use_text = self.options.text_to_decoder and record.text
            prompt = processor.prompt_ids(record.text if use_text else self.options.prompt)
            target = processor.target_ids(record.target)
            ids, labels = prompt + target, [-100] * len(prompt) + target
            if self.max_length and len(ids) > self.max_length:
                ids, labels = ids[: self.max_length], labels[: self.max_length]
                self.truncated += 1
                if self.truncated == 1:
                    logger.warning(
                        "%s: decoder text cut to data.max_length=%d (further cuts are counted)",
                        record.where,
                        self.max_length,
                    )
            example["input_ids"], example["labels"] = ids, labels
        if "image" in media:
            example["pixel_values"] = processor.images_to_pixels([media["image"]])[0]  # (3, H, W)
        if "audio" in media:
            example["audio"] = media["audio"]
            self.audio_truncated += bool(media.get("audio_truncated"))
        if record.text and "text" in self.modalities:
            example["text_input_ids"] = processor.text_encoder_ids(record.text)
        if record.labels is not None:
            hot = [0.0] * len(self.label_names)
            for name in record.labels:
                hot[self.label_index[name]] = 1.0
            example["mm_labels"] = hot
        return example


# ----------------------------------------------------------------------------- collator


class MultimodalCollator:
    """Examples with any subset of modalities -> one batch.

    Decoder text is right-padded (`input_ids`, `attention_mask`, `labels` with -100). Each modality present
    in at least one example gets a (B, ...) tensor and a (B,) presence mask (`image_mask`, `audio_mask`,
    `text_mask`, `mm_label_mask`); rows without it hold placeholders that the model never reads.
    """

    def __init__(self, processor, pad_to_multiple_of: int | None = None) -> None:
        self.processor = processor
        self.pad_to_multiple_of = pad_to_multiple_of

    def _pad(self, seqs: list[list[int]], value: int) -> torch.Tensor:
        length = max(len(s) for s in seqs)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return torch.tensor([list(s) + [value] * (length - len(s)) for s in seqs], dtype=torch.long)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        size = len(examples)
        if any("input_ids" in ex for ex in examples):
            bos = self.processor.prompt_ids("")
            ids = [ex.get("input_ids", bos) for ex in examples]
            batch["input_ids"] = self._pad(ids, self.processor.tokenizer.pad_token_id or 0)
            batch["attention_mask"] = self._pad([[1] * len(s) for s in ids], 0)
            batch["labels"] = self._pad([ex.get("labels", [-100] * len(bos)) for ex in examples], -100)
        rows = [i for i, ex in enumerate(examples) if "pixel_values" in ex]
        if rows:
            pixels = torch.zeros(size, *examples[rows[0]]["pixel_values"].shape)
            for i in rows:
                pixels[i] = examples[i]["pixel_values"]
            batch["pixel_values"], batch["image_mask"] = pixels, _mask(size, rows)
        rows = [i for i, ex in enumerate(examples) if "audio" in ex]
        if rows:
            values, mask = self.processor.audio_to_values([examples[i]["audio"] for i in rows])
            index = torch.tensor(rows)
            batch["input_values"] = values.new_zeros(size, values.shape[1]).index_copy(0, index, values)
            batch["audio_attention_mask"] = mask.new_zeros(size, mask.shape[1]).index_copy(0, index, mask)
            batch["audio_mask"] = _mask(size, rows)
        rows = [i for i, ex in enumerate(examples) if "text_input_ids" in ex]
        if rows:
            pad = self.processor.text_encoder_tokenizer.pad_token_id or 0
            seqs = [examples[i].get("text_input_ids", [pad]) for i in range(size)]
            batch["text_input_ids"] = self._pad(seqs, pad)
            batch["text_attention_mask"] = self._pad([[1] * len(s) for s in seqs], 0)
            batch["text_mask"] = _mask(size, rows)
        rows = [i for i, ex in enumerate(examples) if "mm_labels" in ex]
        if rows:
            hot = torch.zeros(size, len(examples[rows[0]]["mm_labels"]))
            for i in rows:
                hot[i] = torch.tensor(examples[i]["mm_labels"])
            batch["mm_labels"], batch["mm_label_mask"] = hot, _mask(size, rows)
        return batch


def _mask(size: int, rows: list[int]) -> torch.Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    mask[rows] = True
    return mask


# ----------------------------------------------------------------------------- entry points


def _label_names(options: MultimodalOptions, processor, records: Iterable[MultimodalRecord]) -> list[str]:
    """Explicit names, else the processor's (set by an earlier split or the model), else sorted found ones."""
    names = options.label_names or list(getattr(processor, "label_names", None) or [])
    if not names:
        names = sorted({x for r in records for x in (r.labels or [])})
    if names and hasattr(processor, "label_names"):
        processor.label_names = list(names)  # the next split (and the saved processor) use the same order
    return names


def build_multimodal_dataset(
    raw, data: DataSection, processor, *, source: str | None = None
) -> MultimodalDataset:
    """One split of raw records (a `datasets.Dataset` or a list of dicts) -> a checked `MultimodalDataset`.

    `source` is the data file (or files, ", "-joined) they came from: messages name it and relative media
    paths are looked up next to it. Record N is the 1-based row of `raw`.
    """
    options = MultimodalOptions.from_section(data)
    label = source or "data"
    base_dirs = _base_dirs(source)
    records = [parse_record(row, f"{label}: record {i}", options, base_dirs) for i, row in enumerate(raw, 1)]
    names = _label_names(options, processor, records)
    return MultimodalDataset(records, processor, options, names, _get(data, "max_length"))


@dataclass
class MultimodalData:
    """What `build_multimodal_data` returns."""

    train: MultimodalDataset
    eval: MultimodalDataset | None = None
    label_names: list[str] = field(default_factory=list)


def _source_records(source: Any, what: str, options: MultimodalOptions) -> list[MultimodalRecord]:
    if isinstance(source, (list, tuple)):
        return [r for s in source for r in _source_records(s, what, options)]
    source = str(source)
    if source.startswith("synthetic:"):
        try:
            source = str(synthetic_mm.materialize(source, what=what, cache_dir=options.cache_dir))
        except ValueError as err:
            raise MoetuneError(f"{what}: {err}") from err
    return read_records(source, options)


def build_multimodal_data(data: DataSection, processor, *, seed: int = 0) -> MultimodalData:
    """A data section (mapping or object) -> train and eval datasets, without the recipe pipeline.

    Reads `train`, `eval` (files or `synthetic:KIND[:N[:SEED]]`), `eval_fraction` (seeded split of train
    when there is no eval), `max_length`, the field names, `on_bad_record`, and `multimodal` (extra options).
    """
    options = MultimodalOptions.from_section(data)
    if not _get(data, "train"):
        raise MoetuneError(
            "data.train: missing; give a multimodal jsonl / json / parquet file or synthetic:KIND"
        )
    train = _source_records(_get(data, "train"), "data.train", options)
    evaluation = _source_records(_get(data, "eval"), "data.eval", options) if _get(data, "eval") else []
    fraction = _get(data, "eval_fraction")
    if not evaluation and fraction:
        if not 0 < float(fraction) < 1:
            raise MoetuneError(f"data.eval_fraction: {fraction} must be between 0 and 1")
        order = np.random.default_rng(seed).permutation(len(train))
        cut = max(1, round(len(order) * float(fraction)))
        evaluation = [train[i] for i in sorted(order[:cut])]
        train = [train[i] for i in sorted(order[cut:])]
    names = _label_names(options, processor, train + evaluation)
    max_length = _get(data, "max_length")
    return MultimodalData(
        train=MultimodalDataset(train, processor, options, names, max_length),
        eval=MultimodalDataset(evaluation, processor, options, names, max_length) if evaluation else None,
        label_names=names,
    )


def make_multimodal_collator(data: DataSection, processor) -> MultimodalCollator:
    """The collator for these datasets (honours `data.pad_to_multiple_of`)."""
    return MultimodalCollator(processor, pad_to_multiple_of=_get(data, "pad_to_multiple_of"))


def prepare_multimodal_inputs(processor, text: str | None, image=None, audio=None) -> dict[str, torch.Tensor]:
    """`finetune.modeling.multimodal.prepare_multimodal_inputs` with user mistakes as one-line MoetuneErrors."""
    try:
        return _mm.prepare_multimodal_inputs(processor, text, image=image, audio=audio)
    except ValueError as err:  # MediaError and "no such encoder"
        raise MoetuneError(str(err)) from err


__all__ = [
    "MediaError",
    "MultimodalCollator",
    "MultimodalData",
    "MultimodalDataset",
    "MultimodalOptions",
    "build_multimodal_data",
    "build_multimodal_dataset",
    "load_audio",
    "load_image",
    "make_multimodal_collator",
    "parse_record",
    "prepare_multimodal_inputs",
    "read_records",
    "resample",
]
