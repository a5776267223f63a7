"""Datasets -> tokenized examples -> batches, as the recipe's `data` section says.

    train, eval = build_datasets(recipe.data, tokenizer, seed=recipe.train.seed)
    collate = make_collator(recipe.data, tokenizer)
    sampler = make_sampler(recipe.data, train, batch_size=..., seed=...)   # None unless group_by_length

Examples carry `input_ids`, `labels` (-100 where no loss is taken) and `length`; packed rows also carry
`position_ids`. The steps, each in its own module: sources (files, folders, globs, hub ids ->
records), formats (records -> ids and labels), packing, collate (batches). Nothing is dropped or cut
silently: skipped records, truncated examples and split documents are counted in `DataStats` and
logged as warnings on the `moetune.data` logger.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np

from finetune.data.collate import PackedCollator, PaddingCollator, length_grouped_sampler, pad_id_of
from finetune.data.formats import (
    IGNORE_INDEX,
    BadRecord,
    chat_examples,
    formats_fitting,
    instruction_examples,
    layout_for,
    map_records,
    resolve_chat_template,
    text_examples,
    text_tokenizer,
    token_features,
)
from finetune.data.packing import Packer
from finetune.data.preference import PreferenceCollator, is_conversational, tokenize_preference
from finetune.data.sources import load_source, quiet_datasets
from finetune.errors import MoetuneError
from finetune.recipe import DataSection

logger = logging.getLogger("moetune.data")

__all__ = [
    "DataStats",
    "SplitStats",
    "build_datasets",
    "build_retain",
    "load_source",
    "make_collator",
    "make_sampler",
    "prepare_datasets",
]


@dataclass
class SplitStats:
    """What happened to one split on its way from records to examples."""

    what: str  # the recipe key: data.train / data.eval
    source: str  # the source(s) it came from, for messages
    records: int = 0  # raw records read (after the split and max_examples)
    skipped: int = 0  # bad records skipped (data.on_bad_record: skip)
    empty: int = 0  # documents with no text, dropped
    truncated: int = 0  # examples cut to data.max_length
    no_target: int = 0  # dropped: no trained token left after truncation
    split_documents: int = 0  # packing: documents continued on the next row
    examples: int = 0  # examples (rows when packed) in the final dataset
    tokens: int = 0
    trained_tokens: int = 0  # tokens with a label (loss is taken on them)
    longest: int = 0  # longest tokenized example before truncation
    shortest: int = 0
    first_problem: str = ""  # the first skipped record and why


@dataclass
class DataStats:
    train: SplitStats
    eval: SplitStats | None = None

    def summary(self) -> str:
        parts = []
        for s in (self.train, self.eval):
            if s is not None:
                tokens = f", {s.tokens} tokens ({s.trained_tokens} trained)" if s.tokens else ""
                parts.append(f"{s.what}: {s.records} records -> {s.examples} examples{tokens}")
        return "; ".join(parts)


@dataclass
class PreparedData:
    train: datasets.Dataset
    eval: datasets.Dataset | None
    stats: DataStats = field(repr=False)


# ----------------------------------------------------------------------------- public API


def build_datasets(
    data: DataSection, tokenizer: Any, *, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(train, eval or None) tokenized datasets; see `prepare_datasets` for the stats as well."""
    prepared = prepare_datasets(data, tokenizer, seed=seed)
    return prepared.train, prepared.eval


def prepare_datasets(
    data: DataSection, tokenizer: Any, *, seed: int, what: str = "data.train"
) -> PreparedData:
    """Load, split (seeded), cap, tokenize, check, pack. Raises MoetuneError on any data mistake.

    `what` names `data.train` in messages (another key when its source is loaded the same way)."""
    with quiet_datasets():
        return _prepare(data, tokenizer, seed=seed, what=what)


def build_retain(data: DataSection, tokenizer: Any, *, seed: int) -> datasets.Dataset | None:
    """`data.retain` as examples (None when unset): the loaders of data.train, its format inferred from
    its own records (general text next to instruction data) unless multimodal, at most
    `data.max_eval_examples` records, packed when data.train is (so the run's collator batches them)."""
    if data.retain is None:
        return None
    section = dataclasses.replace(
        data,
        train=data.retain,
        eval=None,
        eval_fraction=None,
        retain=None,
        format="multimodal" if data.format == "multimodal" else None,
        max_examples=data.max_eval_examples,
    )
    return prepare_datasets(section, tokenizer, seed=seed, what="data.retain").train


def _prepare(data: DataSection, tokenizer: Any, *, seed: int, what: str) -> PreparedData:
    train_specs = _resolve(data.train, what, data)
    eval_specs = _resolve(data.eval, "data.eval", data) if data.eval is not None else None
    skip = data.on_bad_record == "skip"
    raw_train = load_source(train_specs, what=what, skip_malformed=skip)
    raw_eval = None
    if eval_specs is not None:
        raw_eval = load_source(eval_specs, what="data.eval", skip_malformed=skip)
    elif data.eval_fraction is not None:
        raw_train, raw_eval = _hold_out(raw_train, data.eval_fraction, seed)
    raw_train = _cap(raw_train, data.max_examples, seed)
    if raw_eval is not None:
        raw_eval = _cap(raw_eval, data.max_eval_examples, seed)

    if data.format == "multimodal":  # records -> checked media + tokens: finetune.data.multimodal
        # `source` names the files the records came from: media paths are relative to them.
        build = _multimodal("build_multimodal_dataset")
        train_source, eval_source = _label(train_specs), _label(eval_specs or train_specs)
        train = build(raw_train, data, tokenizer, source=train_source)
        evals = build(raw_eval, data, tokenizer, source=eval_source) if raw_eval is not None else None
        stats = DataStats(SplitStats(what, train_source, records=len(raw_train), examples=len(train)))
        if evals is not None:
            stats.eval = SplitStats("data.eval", eval_source, records=len(raw_eval), examples=len(evals))
        return PreparedData(train, evals, stats)

    data, note = layout_for(data, raw_train.column_names, f"{what} ({_label(data.train)})")
    if note:
        logger.warning("%s", note)
    chat = data.format == "chat" or (
        data.format == "preference" and len(raw_train) and is_conversational(raw_train[0], data.prompt_field)
    )
    template = resolve_chat_template(tokenizer, data.chat_template) if chat else None
    train_stats = SplitStats(what, _label(data.train))
    train = _tokenize(raw_train, data, tokenizer, template, train_stats)
    eval_stats = eval_set = None
    if raw_eval is not None:
        eval_stats = SplitStats(
            "data.eval", _label(data.eval) if data.eval is not None else f"held out of {_label(data.train)}"
        )
        eval_set = _tokenize(raw_eval, data, tokenizer, template, eval_stats)
    stats = DataStats(train_stats, eval_stats)
    for s in (train_stats, eval_stats):
        if s is not None:
            _report(s, data)
    logger.info("data: %s", stats.summary())
    return PreparedData(train, eval_set, stats)


def make_collator(data: DataSection, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """The batch function for a DataLoader: packed rows, dynamic padding, or the multimodal collator."""
    if data.format == "multimodal":
        return _multimodal("make_multimodal_collator")(data, tokenizer)
    pad_id = pad_id_of(tokenizer)
    if data.format == "preference":
        return PreferenceCollator(pad_id, data.pad_to_multiple_of)
    if data.packing:
        return PackedCollator(pad_id, data.pad_to_multiple_of)
    return PaddingCollator(pad_id, data.pad_to_multiple_of)


def make_sampler(data: DataSection, dataset: datasets.Dataset, *, batch_size: int, seed: int) -> Any:
    """A length-bucketing sampler when `data.group_by_length`, else None (shuffle as usual)."""
    if not data.group_by_length:
        return None
    return length_grouped_sampler(dataset["length"], batch_size, seed)


# ----------------------------------------------------------------------------- steps


def _label(source: str | list[str]) -> str:
    return source if isinstance(source, str) else ", ".join(source)


def _multimodal(name: str) -> Callable[..., Any]:
    """A function of `finetune.data.multimodal` (the multimodal half fills that module)."""
    try:
        module = importlib.import_module("finetune.data.multimodal")
    except ImportError as err:
        raise MoetuneError("data.format multimodal: this install has no finetune.data.multimodal") from err
    if not hasattr(module, name):
        raise MoetuneError(f"data.format multimodal: finetune.data.multimodal has no {name}()")
    return getattr(module, name)


def _resolve(spec: str | list[str], what: str, data: DataSection) -> list[str]:
    """The sources as a list, with `synthetic:KIND[:N[:SEED]]` (generated multimodal data, see
    finetune.data.synthetic_mm) materialised to the records file it writes."""
    specs = spec if isinstance(spec, list) else [spec]
    if data.format != "multimodal" or not any(s.startswith("synthetic:") for s in specs):
        return specs
    from finetune.data.synthetic_mm import materialize

    cache_dir = (data.multimodal or {}).get("cache_dir")
    try:
        return [
            str(materialize(s, what=what, cache_dir=cache_dir)) if s.startswith("synthetic:") else s
            for s in specs
        ]
    except ValueError as err:
        raise MoetuneError(f"{what}: {err}") from err


def _hold_out(raw: datasets.Dataset, fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """A seeded split by record: the same seed, the same held-out records."""
    n = len(raw)
    n_eval = math.ceil(n * fraction)
    if n < 2 or n_eval >= n:
        raise MoetuneError(
            f"data.eval_fraction {fraction} of {n} record(s) leaves nothing to train or to evaluate; "
            "add records or give data.eval"
        )
    order = _permutation(n, seed)
    return raw.select(sorted(order[n_eval:]), keep_in_memory=True), raw.select(
        sorted(order[:n_eval]), keep_in_memory=True
    )


def _cap(raw: datasets.Dataset, limit: int | None, seed: int) -> datasets.Dataset:
    if limit is None or len(raw) <= limit:
        return raw
    return raw.select(sorted(_permutation(len(raw), seed)[:limit]), keep_in_memory=True)


def _permutation(n: int, seed: int) -> list[int]:
    """A seeded permutation of range(n): the same seed picks the same records on every machine."""
    return np.random.default_rng(seed).permutation(n).tolist()


def _fingerprint(raw: datasets.Dataset, data: DataSection, tokenizer: Any, template: str | None) -> str:
    tok = text_tokenizer(tokenizer)
    key = f"{raw._fingerprint}|{data!r}|{getattr(tok, 'name_or_path', '')}|{len(tok)}|{template}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _tokenize(
    raw: datasets.Dataset, data: DataSection, tokenizer: Any, template: str | None, stats: SplitStats
) -> datasets.Dataset:
    """Records -> examples with the recipe's format, truncation (counted) and packing."""
    stats.records = len(raw)
    if len(raw) == 0:
        raise MoetuneError(f"{stats.what} ({stats.source}): no records")
    if data.format == "preference":  # pairs, not (input_ids, labels): finetune.data.preference
        pairs = tokenize_preference(
            raw,
            data,
            tokenizer,
            template,
            stats,
            lambda index, bad, record: _bad_record(stats, data, index, bad, record),
            _fingerprint(raw, data, tokenizer, template),
        )
        return _checked_nonempty(pairs, stats)
    split_long = data.packing and data.format == "text"  # text flows across rows; other formats stay whole
    packer = Packer(data.max_length, split_long=split_long) if data.packing else None
    specials = set(text_tokenizer(tokenizer).all_special_ids)
    lengths: list[int] = []  # of every example before truncation
    names = ("input_ids", "labels", "position_ids") if packer is not None else ("input_ids", "labels")

    def columns(rows: list[dict[str, list[int]]]) -> dict[str, list]:
        """Rows -> output columns, with their `length`; counts the tokens as they leave."""
        out: dict[str, list] = {name: [row[name] for row in rows] for name in names}
        out["length"] = [len(ids) for ids in out["input_ids"]]
        stats.tokens += sum(out["length"])
        stats.trained_tokens += sum(label != IGNORE_INDEX for row in out["labels"] for label in row)
        return out

    def convert(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        records = [dict(zip(batch, values)) for values in zip(*batch.values())]
        if data.format == "text":
            converted = text_examples(records, tokenizer, data.text_field)
        elif data.format == "instruction":
            converted = instruction_examples(
                records, tokenizer, data.prompt_field, data.response_field, data.separator, data.input_field
            )
        else:
            converted = chat_examples(records, tokenizer, data.messages_field, template)
        rows: list[dict[str, list[int]]] = []
        for index, item, record in zip(indices, converted, records):
            if isinstance(item, BadRecord):
                _bad_record(stats, data, index, item, record)
                continue
            ids, labels = item
            if data.format == "text" and all(i in specials for i in ids):
                stats.empty += 1
                continue
            lengths.append(len(ids))
            if len(ids) > data.max_length and not split_long:
                stats.truncated += 1
                ids, labels = ids[: data.max_length], labels[: data.max_length]
                if all(label == IGNORE_INDEX for label in labels):
                    stats.no_target += 1
                    continue
            if packer is None:
                rows.append({"input_ids": ids, "labels": labels})
            else:
                packer.add(ids, labels)
        if packer is not None:  # hand over the rows completed so far; the open row continues
            rows = list(packer.rows)
            packer.rows.clear()
        return columns(rows)

    examples = map_records(raw, convert, _fingerprint(raw, data, tokenizer, template), token_features(names))
    if packer is not None:
        last = packer.finish()
        if last:
            tail = datasets.Dataset.from_dict(columns(last), features=examples.features)
            examples = datasets.concatenate_datasets([examples, tail])
        stats.split_documents = packer.split_documents
    if lengths:
        stats.longest, stats.shortest = max(lengths), min(lengths)
    if lengths and stats.truncated == len(lengths):
        hint = " or set data.packing: true" if data.format == "text" else ""
        raise MoetuneError(
            f"{stats.what} ({stats.source}): every example is longer than data.max_length={data.max_length} "
            f"tokens (the shortest has {stats.shortest}); raise data.max_length{hint}"
        )
    return _checked_nonempty(examples, stats)


def _checked_nonempty(examples: datasets.Dataset, stats: SplitStats) -> datasets.Dataset:
    """`examples`, counted in `stats`; none left is an error that says why."""
    if len(examples) == 0:
        reasons = [
            f"{n} {why}"
            for n, why in (
                (stats.skipped, "bad record(s) skipped"),
                (stats.empty, "empty document(s)"),
                (stats.no_target, "example(s) with nothing to learn after truncation"),
            )
            if n
        ]
        first = f"; first: {stats.first_problem}" if stats.first_problem else ""
        raise MoetuneError(
            f"{stats.what} ({stats.source}): no examples left after filtering ({'; '.join(reasons)}{first}); "
            "check the data"
        )
    stats.examples = len(examples)
    return examples


def _bad_record(stats: SplitStats, data: DataSection, index: int, bad: BadRecord, record: dict) -> None:
    where = f"{stats.what} ({stats.source}) record {index + 1}"
    if data.on_bad_record == "fail":
        fits = [
            f
            for f in formats_fitting([k for k, v in record.items() if v is not None], data)
            if f != data.format
        ]
        hint = f" (its fields fit data.format: {fits[0]})" if fits else ""
        raise MoetuneError(f"{where}: {bad}{hint}; fix the record or set data.on_bad_record: skip")
    stats.skipped += 1
    if not stats.first_problem:
        stats.first_problem = f"record {index + 1}: {bad}"


def _report(stats: SplitStats, data: DataSection) -> None:
    """Warnings for everything that changed or dropped data: never silent."""
    if stats.skipped:
        logger.warning(
            "%s: skipped %d bad record(s) of %d (data.on_bad_record: skip); first: %s",
            stats.what,
            stats.skipped,
            stats.records,
            stats.first_problem,
        )
    if stats.empty:  # an empty __init__.py in a code folder: nothing lost, so not a warning
        logger.info("%s: dropped %d empty document(s)", stats.what, stats.empty)
    if stats.truncated:
        logger.warning(
            "%s: truncated %d example(s) longer than data.max_length=%d (longest: %d tokens)",
            stats.what,
            stats.truncated,
            data.max_length,
            stats.longest,
        )
    if stats.no_target:
        logger.warning(
            "%s: dropped %d example(s) whose prompt fills data.max_length=%d, leaving nothing to learn",
            stats.what,
            stats.no_target,
            data.max_length,
        )
    if stats.split_documents:
        logger.info(
            "%s: packing continued %d document(s) longer than the room left in a row on the next row",
            stats.what,
            stats.split_documents,
        )
