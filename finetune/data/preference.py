"""`data.format: preference`: {"prompt", "chosen", "rejected"} records -> token ids of prompt and both answers.

Records are plain text (three strings) or conversational (TRL's layout): `prompt` a list of
{role, content} messages, `chosen` / `rejected` the assistant message(s) that follow it (a string is
read as one assistant message). Tokenization is TRL's (trl 1.16 DPOTrainer): plain text is tokenized
as `prompt` and as `prompt + answer + EOS` (EOS added unless the answer ends with it), a conversation
as the chat-templated prompt (with the generation prompt) and the templated prompt + answer; the
answer starts where the two tokenizations diverge, so a merge across the boundary never loses a token.

Truncation (`data.max_length` per sequence, prompt + the longer answer): the prompt goes first, from
its start (the tokens next to the answer are kept), down to half of max_length; if the pair still does
not fit, the answers are cut at the end. TRL 1.16 instead keeps the start of prompt + answer and
drops pairs whose prompt alone fills max_length; docs/preference.md says so. Truncated pairs are counted.

Batches (`PreferenceCollator`): B pairs as 2B rows, the chosen sequences then the rejected ones,
right-padded, labels -100 on the prompt and the padding: what finetune/losses.py reads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from finetune.data.formats import IGNORE_INDEX, BadRecord, map_records, text_tokenizer, token_features

Pair = tuple[list[int], list[int], list[int]]  # (prompt ids, chosen ids, rejected ids)
ANSWER_FIELDS = ("chosen", "rejected")


def is_conversational(record: dict, prompt_field: str) -> bool:
    return isinstance(record.get(prompt_field), list)


def _messages(value: Any, name: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise BadRecord(f"field '{name}' must be a non-empty list of {{role, content}} messages")
    for i, m in enumerate(value):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise BadRecord(f"{name}[{i}] must be an object with string 'role' and 'content'")
    return [{k: v for k, v in m.items() if v is not None} for m in value]


def _answer_messages(value: Any, name: str) -> list[dict]:
    """A conversational answer: its messages, or one assistant message for a plain string."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    return _messages(value, name)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _checked(record: dict, prompt_field: str) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) of a record, or a BadRecord naming the field."""
    values = []
    for name in (prompt_field, *ANSWER_FIELDS):
        if record.get(name) is None:
            present = ", ".join(k for k, v in record.items() if v is not None) or "none"
            raise BadRecord(f"missing field '{name}' (fields present: {present})")
        values.append(record[name])
    prompt, chosen, rejected = values
    if isinstance(prompt, list):
        return (
            _messages(prompt, prompt_field),
            _answer_messages(chosen, "chosen"),
            _answer_messages(rejected, "rejected"),
        )
    if not isinstance(prompt, str):
        raise BadRecord(
            f"field '{prompt_field}' must be a string or a list of messages, got {type(prompt).__name__}"
        )
    for name, value in zip(ANSWER_FIELDS, (chosen, rejected)):
        if not isinstance(value, str):
            raise BadRecord(f"field '{name}' must be a string when the prompt is, got {type(value).__name__}")
    return prompt, chosen, rejected


def preference_pairs(
    records: list[dict], tokenizer: Any, prompt_field: str, template: str | None
) -> list[Pair | BadRecord]:
    """Each record's (prompt ids, chosen ids, rejected ids), or the BadRecord that says what is wrong."""
    tok = text_tokenizer(tokenizer)
    eos = tok.eos_token or ""

    def encode(value: Any, *, generation_prompt: bool = False) -> list[int]:
        if isinstance(value, str):
            return list(tok(text=value)["input_ids"])
        try:
            out = tok.apply_chat_template(
                value,
                tokenize=True,
                return_dict=True,
                chat_template=template,
                add_generation_prompt=generation_prompt,
            )
        except Exception as err:  # noqa: BLE001  (a Jinja error raised by the template about this record)
            raise BadRecord(
                f"the chat template refused it: {str(err).splitlines()[0] if str(err) else err}"
            ) from err
        return list(out["input_ids"])

    out: list[Pair | BadRecord] = []
    for record in records:
        try:
            prompt, chosen, rejected = _checked(record, prompt_field)
            if chosen == rejected:
                raise BadRecord("'chosen' and 'rejected' are the same: nothing to prefer")
            if isinstance(prompt, str):
                prompt_ids = encode(prompt)
                chosen_full, rejected_full = (
                    encode(prompt + answer + ("" if answer.endswith(eos) else eos))
                    for answer in (chosen, rejected)
                )
            else:
                prompt_ids = encode(prompt, generation_prompt=True)
                chosen_full, rejected_full = encode(prompt + chosen), encode(prompt + rejected)
            cut = min(_common_prefix(prompt_ids, chosen_full), _common_prefix(prompt_ids, rejected_full))
            pair = (prompt_ids[:cut], chosen_full[cut:], rejected_full[cut:])
            for name, ids in zip(ANSWER_FIELDS, pair[1:]):
                if not ids:
                    raise BadRecord(f"field '{name}' renders to no tokens: nothing to learn")
            out.append(pair)
        except BadRecord as bad:
            out.append(bad)
    return out


def truncate_pair(pair: Pair, max_length: int) -> tuple[Pair, bool]:
    """(the pair fitted to `max_length` tokens per sequence, whether anything was cut): the prompt's
    start first (down to max_length // 2 tokens), then the answers' ends."""
    prompt, chosen, rejected = pair
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= max_length:
        return pair, False
    keep = max(max_length - longest, min(len(prompt), max_length // 2))
    prompt = prompt[len(prompt) - keep :]
    room = max_length - len(prompt)
    return (prompt, chosen[:room], rejected[:room]), True


def pair_columns(pairs: list[Pair]) -> dict[str, list]:
    """Dataset columns of tokenized pairs; `length` is prompt + the longer answer (length bucketing)."""
    return {
        "prompt_ids": [p for p, _, _ in pairs],
        "chosen_ids": [c for _, c, _ in pairs],
        "rejected_ids": [r for _, _, r in pairs],
        "length": [len(p) + max(len(c), len(r)) for p, c, r in pairs],
    }


def tokenize_preference(
    raw: Any,
    data: Any,
    tokenizer: Any,
    template: str | None,
    stats: Any,
    on_bad: Callable[[int, BadRecord, dict], None],
    fingerprint: str,
) -> Any:
    """Records -> a dataset of pairs (prompt_ids, chosen_ids, rejected_ids, length), truncated and counted
    in `stats`; `on_bad(index, bad, record)` fails or skips a bad record as the recipe says."""
    lengths: list[int] = []

    def convert(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        records = [dict(zip(batch, values)) for values in zip(*batch.values())]
        kept: list[Pair] = []
        for index, item, record in zip(
            indices, preference_pairs(records, tokenizer, data.prompt_field, template), records
        ):
            if isinstance(item, BadRecord):
                on_bad(index, item, record)
                continue
            lengths.append(len(item[0]) + max(len(item[1]), len(item[2])))
            item, cut = truncate_pair(item, data.max_length)
            stats.truncated += cut
            kept.append(item)
        columns = pair_columns(kept)
        stats.tokens += sum(len(p) * 2 + len(c) + len(r) for p, c, r in kept)
        stats.trained_tokens += sum(len(c) + len(r) for _, c, r in kept)
        return columns

    pairs = map_records(
        raw, convert, fingerprint, token_features(("prompt_ids", "chosen_ids", "rejected_ids"))
    )
    if lengths:
        stats.longest, stats.shortest = max(lengths), min(lengths)
    return pairs


def _padded(rows: Sequence[Sequence[int]], width: int, fill: int) -> torch.Tensor:
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


class PreferenceCollator:
    """B pairs -> `input_ids`, `attention_mask`, `labels` (2B, T): the chosen rows, then the rejected rows
    (TRL's DataCollatorForPreference layout), right-padded to the longest (a multiple of `pad_to_multiple_of`)."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_id, self.pad_to_multiple_of = pad_id, pad_to_multiple_of

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, labels = [], []
        for answer in ANSWER_FIELDS:
            for f in features:
                prompt, completion = list(f["prompt_ids"]), list(f[f"{answer}_ids"])
                ids.append(prompt + completion)
                labels.append([IGNORE_INDEX] * len(prompt) + completion)
        width = max(len(row) for row in ids)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return {
            "input_ids": _padded(ids, width, self.pad_id),
            "attention_mask": _padded([[1] * len(row) for row in ids], width, 0),
            "labels": _padded(labels, width, IGNORE_INDEX),
        }
