"""Raw records -> token ids and labels, one function per `data.format`.

Every format yields `input_ids` and `labels` of the same length; labels are -100 where no loss is taken:
- text: loss on every token; the tokenizer's own special tokens, then EOS closes each document;
- instruction: `prompt + separator` (no loss) then `response + EOS` (loss); an `input` field, when
  present and not empty, is appended to the prompt on a new line (Alpaca's instruction / input /
  output records, read the way LLaMA-Factory reads them: instruction + "\n" + input);
- chat: the conversation rendered with a chat template; loss only on what the template emits for
  assistant turns (their content and end-of-turn marks). Each part is tokenized on its own, exactly as
  the prompt is tokenized at inference time before the model generates the answer.
A record with a missing or malformed field raises `BadRecord`; the caller fails or skips it as the
recipe says (`data.on_bad_record`). `layout_for` picks the format (when the recipe leaves it out) and
the field names from the fields the records have.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from typing import Any

import datasets

from finetune.errors import MoetuneError

IGNORE_INDEX = -100
Example = tuple[list[int], list[int]]  # (input_ids, labels)
# Alpaca's record layout (instruction / input / output), read as format instruction.
ALPACA = ("instruction", "input", "output")
DEFAULT_FIELDS = {"prompt_field": "prompt", "response_field": "response"}


class BadRecord(Exception):
    """A record this format cannot use; the message says which field and why."""


def text_tokenizer(tokenizer: Any) -> Any:
    """The text tokenizer inside a multimodal processor, or the tokenizer itself."""
    return getattr(tokenizer, "tokenizer", tokenizer)


def _field(record: dict, name: str) -> Any:
    """record[name]; missing or null is a BadRecord that lists the fields the record has."""
    if record.get(name) is None:
        present = ", ".join(k for k, v in record.items() if v is not None) or "none"
        raise BadRecord(f"missing field '{name}' (fields present: {present})")
    return record[name]


def _string_field(record: dict, name: str) -> str:
    value = _field(record, name)
    if not isinstance(value, str):
        raise BadRecord(f"field '{name}' must be a string, got {type(value).__name__}")
    return value


def _adds_bos(tok: Any) -> bool:
    """Whether the tokenizer puts BOS before a text when asked for its special tokens."""
    bos = tok.bos_token_id
    return bos is not None and tok("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def _eos(tok: Any) -> list[int]:
    return [tok.eos_token_id] if tok.eos_token_id is not None else []


# ----------------------------------------------------------------------------- text


def text_examples(records: list[dict], tokenizer: Any, field: str) -> list[Example | BadRecord]:
    tok = text_tokenizer(tokenizer)
    texts: list[str | BadRecord] = []
    for record in records:
        try:
            texts.append(_string_field(record, field))
        except BadRecord as bad:
            texts.append(bad)
    good = [t for t in texts if isinstance(t, str)]
    encoded = iter(tok(good, add_special_tokens=True)["input_ids"] if good else [])
    eos = _eos(tok)
    out: list[Example | BadRecord] = []
    for t in texts:
        if isinstance(t, BadRecord):
            out.append(t)
            continue
        ids = list(next(encoded))
        if eos and (not ids or ids[-1] != eos[0]):
            ids += eos
        out.append((ids, list(ids)))
    return out


# ----------------------------------------------------------------------------- instruction


def instruction_examples(
    records: list[dict],
    tokenizer: Any,
    prompt_field: str,
    response_field: str,
    separator: str,
    input_field: str | None = None,
) -> list[Example | BadRecord]:
    tok = text_tokenizer(tokenizer)
    pairs: list[tuple[str, str] | BadRecord] = []
    for record in records:
        try:
            prompt = _string_field(record, prompt_field)
            extra = record.get(input_field) if input_field else None
            if extra is not None and not isinstance(extra, str):
                raise BadRecord(f"field '{input_field}' must be a string, got {type(extra).__name__}")
            if extra:  # Alpaca: the input follows the instruction on a new line
                prompt = f"{prompt}\n{extra}"
            pairs.append((prompt, _string_field(record, response_field)))
        except BadRecord as bad:
            pairs.append(bad)
    good = [p for p in pairs if isinstance(p, tuple)]
    prompts = iter(
        tok([p + separator for p, _ in good], add_special_tokens=False)["input_ids"] if good else []
    )
    answers = iter(tok([r for _, r in good], add_special_tokens=False)["input_ids"] if good else [])
    bos = [tok.bos_token_id] if _adds_bos(tok) else []
    eos = _eos(tok)
    out: list[Example | BadRecord] = []
    for pair in pairs:
        if isinstance(pair, BadRecord):
            out.append(pair)
            continue
        prompt, answer = bos + list(next(prompts)), list(next(answers)) + eos
        if not answer:
            out.append(BadRecord(f"field '{response_field}' is empty: nothing to learn"))
            continue
        out.append((prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
    return out


# ----------------------------------------------------------------------------- chat


# moetune's documented default (`data.chat_template: simple`): the presets' template, one
# `<|role|>` line before each message.
def simple_chat_template() -> str:
    from finetune.tokenizer import CHAT_TEMPLATE

    return CHAT_TEMPLATE


def resolve_chat_template(tokenizer: Any, setting: str | None) -> str:
    """The Jinja template to use: the recipe's, moetune's `simple` one, or the tokenizer's own."""
    if setting == "simple":
        return simple_chat_template()
    if setting:
        return setting
    own = getattr(tokenizer, "chat_template", None) or getattr(
        text_tokenizer(tokenizer), "chat_template", None
    )
    if not own:
        raise MoetuneError(
            "data.format chat: the tokenizer has no chat template; set data.chat_template: simple "
            "(moetune's default, '<|role|>' lines) or give a Jinja template"
        )
    return own


def _messages(record: dict, field: str) -> list[dict]:
    messages = _field(record, field)
    if not isinstance(messages, list) or not messages:
        raise BadRecord(f"field '{field}' must be a non-empty list of {{role, content}} messages")
    clean = []
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise BadRecord(f"{field}[{i}] must be an object with string 'role' and 'content'")
        clean.append({k: v for k, v in m.items() if v is not None})  # drop nulls from Arrow's unified structs
    if not any(m["role"] == "assistant" for m in clean):
        raise BadRecord(f"field '{field}' has no assistant message: nothing to learn")
    return clean


def _chat_segments(messages: list[dict], render: Callable[..., str]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_assistant) pieces.

    An assistant turn i spans from the end of `render(messages[:i], add_generation_prompt=True)` to the end
    of `render(messages[:i+1])`; this needs a template whose renders of prefixes are prefixes of the whole."""
    full = render(messages, add_generation_prompt=False)
    cuts: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = render(messages[:i], add_generation_prompt=True) if i else ""
        end = render(messages[: i + 1], add_generation_prompt=False)
        if not (end.startswith(start) and full.startswith(end)):
            raise BadRecord(
                "the chat template renders earlier turns differently once later turns are added, so assistant "
                "turns cannot be located; use data.chat_template: simple or a template without that behaviour"
            )
        cuts.append((len(start), len(end)))
    pieces, pos = [], 0
    for start, end in cuts:
        start = max(start, pos)
        if start > pos:
            pieces.append((full[pos:start], False))
        if end > start:
            pieces.append((full[start:end], True))
        pos = max(pos, end)
    if pos < len(full):
        pieces.append((full[pos:], False))
    return pieces


def chat_examples(
    records: list[dict], tokenizer: Any, field: str, template: str
) -> list[Example | BadRecord]:
    tok = text_tokenizer(tokenizer)

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return tok.apply_chat_template(
                messages, tokenize=False, chat_template=template, add_generation_prompt=add_generation_prompt
            )
        except Exception as err:  # noqa: BLE001  (a Jinja error raised by the template about this record)
            raise BadRecord(
                f"the chat template refused it: {str(err).splitlines()[0] if str(err) else err}"
            ) from err

    segments: list[list[tuple[str, bool]] | BadRecord] = []
    for record in records:
        try:
            segments.append(_chat_segments(_messages(record, field), render))
        except BadRecord as bad:
            segments.append(bad)
    texts = [text for s in segments if not isinstance(s, BadRecord) for text, _ in s]
    encoded = iter(tok(texts, add_special_tokens=False)["input_ids"] if texts else [])
    out: list[Example | BadRecord] = []
    for s in segments:
        if isinstance(s, BadRecord):
            out.append(s)
            continue
        ids: list[int] = []
        labels: list[int] = []
        for _, trained in s:
            piece = list(next(encoded))
            ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
        if all(label == IGNORE_INDEX for label in labels):
            out.append(BadRecord("its assistant turns render to no tokens: nothing to learn"))
            continue
        out.append((ids, labels))
    return out


# ----------------------------------------------------------------------------- layout


def formats_fitting(fields: Collection[str], data: Any) -> list[str]:
    """The formats whose fields are all among `fields` (with the recipe's field names)."""
    fits = []
    if {data.prompt_field, "chosen", "rejected"} <= set(fields):
        return ["preference"]  # its prompt field would fit nothing else without a response
    if data.messages_field in fields:
        fits.append("chat")
    if {data.prompt_field, data.response_field} <= set(fields) or {"instruction", "output"} <= set(fields):
        fits.append("instruction")
    if data.text_field in fields:
        fits.append("text")
    return fits


def _needs(fmt: str, data: Any) -> str:
    return {
        "chat": f"'{data.messages_field}'",
        "instruction": f"'{data.prompt_field}' + '{data.response_field}' (or Alpaca's 'instruction' + 'output')",
        "text": f"'{data.text_field}'",
        "preference": f"'{data.prompt_field}' + 'chosen' + 'rejected'",
    }[fmt]


def layout_for(data: Any, fields: Collection[str], where: str) -> tuple[Any, str | None]:
    """(the data section with its format and field names decided, a note saying what was inferred).

    `fields` are the records' field names. A format left out (null) is inferred when exactly one fits,
    as TRL's SFTTrainer does (messages -> chat, prompt / completion -> instruction, text -> text);
    instruction records in Alpaca's layout (instruction, input, output) are read as such when the
    recipe keeps the default field names. A format whose fields the records lack entirely is refused
    naming the format that fits them."""
    present = ", ".join(sorted(fields)) or "none"
    note = None
    fmt = data.format
    if fmt is None:
        fits = formats_fitting(fields, data)
        if len(fits) != 1:
            if data.image_field in fields or data.audio_field in fields:
                raise MoetuneError(
                    f"{where}: the records have media fields ({present}); set data.format: multimodal"
                )
            needs = "; ".join(
                f"{f} needs {_needs(f, data)}" for f in ("chat", "instruction", "text", "preference")
            )
            what = f"fit several formats ({', '.join(fits)})" if fits else "fit no format"
            raise MoetuneError(
                f"{where}: cannot infer data.format: the records' fields ({present}) {what} ({needs}); "
                "set data.format (and its field names, e.g. data.text_field)"
            )
        fmt = fits[0]
        note = f"{where}: data.format not set; the records' fields ({present}) fit {fmt}"
    if fmt == "instruction":
        uses_defaults = (data.prompt_field, data.response_field) == tuple(DEFAULT_FIELDS.values())
        if uses_defaults and data.prompt_field not in fields and {"instruction", "output"} <= set(fields):
            data = dataclasses.replace(data, prompt_field="instruction", response_field="output")
            layout = "Alpaca layout: instruction + input -> output"
            note = f"{note}; {layout}" if note else f"{where}: {layout}"
    required = {
        "text": [data.text_field],
        "chat": [data.messages_field],
        "instruction": [data.prompt_field, data.response_field],
        "preference": [data.prompt_field, "chosen", "rejected"],
    }.get(fmt, [])
    absent = [name for name in required if name not in fields]
    if absent:
        fits = [f for f in formats_fitting(fields, data) if f != fmt]
        hint = (
            f"; they fit data.format: {fits[0]}" if fits else "; set the data.*_field keys to the names used"
        )
        raise MoetuneError(
            f"{where}: data.format is {fmt} but no record has the field '{absent[0]}' (fields: {present}){hint}"
        )
    return dataclasses.replace(data, format=fmt), note


def token_features(names: Collection[str]) -> datasets.Features:
    """Token columns as int32 lists (half of int64's memory; vocabularies fit easily), and `length`."""
    token_lists = {name: datasets.List(datasets.Value("int32")) for name in names}
    return datasets.Features({**token_lists, "length": datasets.Value("int32")})


def map_records(
    raw: datasets.Dataset,
    convert: Callable[[dict[str, list], list[int]], dict[str, list]],
    fingerprint: str,
    features: datasets.Features,
) -> datasets.Dataset:
    """`convert(batch, indices)` over `raw` in batches of 1000, into a new in-memory dataset of
    `features` (the records' columns dropped), named by `fingerprint` and never read from a cache file."""
    return raw.map(
        convert,
        batched=True,
        batch_size=1000,
        with_indices=True,
        remove_columns=raw.column_names,
        keep_in_memory=True,
        load_from_cache_file=False,
        new_fingerprint=fingerprint,
        features=features,
    )
