"""Task metrics of a model on collated eval batches: generation, classification, retrieval.

The batches are the ones training uses (finetune.data's collators), so one code path serves a run's
eval, `moetune evaluate` and the benchmarks:
- generation (`exact_match`, `word_accuracy`): each row's prompt is its input before the first label
  token, its reference the labelled span that follows (instruction / chat responses, multimodal
  targets after the media prefix). Greedy decoding with the KV cache, batched over the rows whose
  prompts have the same length, so no row is padded (the result does not depend on how a model
  handles left padding);
- `macro_f1`: the multi-label head's sigmoid > 0.5 against `mm_labels` (rows that carry labels);
- `recall_at_1`: the first two modalities' embeddings in the shared space (e.g. image and text),
  paired by row.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from finetune.errors import MoetuneError
from finetune.evaluation import metrics as m
from finetune.losses import IGNORE_INDEX

# Batch keys that are not per-row model inputs of generation.
_TEXT_KEYS = ("input_ids", "attention_mask", "labels", "position_ids", "mm_labels", "mm_label_mask")


def split_prompt(ids: torch.Tensor, labels: torch.Tensor) -> tuple[list[int], list[int]] | None:
    """(prompt ids, reference ids) of one row: the input before the first label token and the labelled
    span after it; None for a row with no label token (nothing to generate)."""
    labelled = (labels != IGNORE_INDEX).nonzero().flatten()
    if labelled.numel() == 0:
        return None
    start = int(labelled[0])
    end = start
    while end < labels.numel() and int(labels[end]) != IGNORE_INDEX:
        end += 1
    return ids[:start].tolist(), ids[start:end].tolist()


def _text_tokenizer(tokenizer: Any) -> Any:
    return getattr(tokenizer, "tokenizer", tokenizer)  # a multimodal processor holds the decoder's


def _cut_at_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids[: ids.index(eos)] if eos is not None and eos in ids else ids


@torch.no_grad()
def generate_references(
    model: nn.Module, batches: Iterable[dict[str, Any]], tokenizer: Any, *, max_new_tokens: int
) -> tuple[list[str], list[str]]:
    """(greedy generations, references) as text, one per row with a labelled span."""
    tok = _text_tokenizer(tokenizer)
    eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = next(model.parameters()).device
    predictions, references = [], []
    for batch in batches:
        if "position_ids" in batch:
            raise MoetuneError(
                "eval.metrics exact_match / word_accuracy cannot generate from packed rows; set data.packing: false"
            )
        if "labels" not in batch:
            continue
        rows = batch["input_ids"].shape[0]
        groups: dict[int, list[tuple[int, list[int], list[int]]]] = defaultdict(list)
        for row in range(rows):
            length = int(batch["attention_mask"][row].sum()) if "attention_mask" in batch else None
            split = split_prompt(batch["input_ids"][row, :length], batch["labels"][row, :length])
            if split is None:
                continue
            prompt, reference = split
            if not prompt:
                raise MoetuneError(
                    "eval.metrics exact_match / word_accuracy: the eval examples have no prompt before their "
                    "target (data.format text trains on every token); use data.format instruction, chat or "
                    "multimodal with targets, or eval.metrics: [loss]"
                )
            groups[len(prompt)].append((row, prompt, reference))
        texts: dict[int, tuple[str, str]] = {}  # row -> (generation, reference): rows keep their order
        for group in groups.values():
            index = torch.tensor([row for row, _, _ in group])
            extra = {
                k: v[index].to(device)
                for k, v in batch.items()
                if k not in _TEXT_KEYS and isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == rows
            }
            prompts = torch.tensor([prompt for _, prompt, _ in group], device=device)  # (G, P)
            out = model.generate(
                input_ids=prompts,
                attention_mask=torch.ones_like(prompts),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=eos,
                **extra,
            )  # (G, P + new): the prompt, then the new tokens
            for (row, prompt, reference), sequence in zip(group, out.tolist()):
                new = _cut_at_eos(sequence[len(prompt) :], eos)
                texts[row] = (
                    tok.decode(new, skip_special_tokens=True),
                    tok.decode(_cut_at_eos(reference, eos), skip_special_tokens=True),
                )
        for row in sorted(texts):
            predictions.append(texts[row][0])
            references.append(texts[row][1])
    return predictions, references


@torch.no_grad()
def classification_predictions(
    model: nn.Module, batches: Iterable[dict[str, Any]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted, gold) multi-hot booleans (N, C) of the rows that carry labels."""
    device = next(model.parameters()).device
    predicted, gold = [], []
    for batch in batches:
        if "mm_labels" not in batch:
            continue
        inputs = {
            k: v.to(device) for k, v in batch.items() if k not in ("labels", "mm_labels", "mm_label_mask")
        }
        logits = model(**inputs).classification_logits  # (B, C)
        if logits is None:
            raise MoetuneError("eval.metrics macro_f1: the model has no classification head (num_labels_mm)")
        rows = batch.get("mm_label_mask", torch.ones(logits.shape[0])).bool()
        predicted.append((logits.float().sigmoid() > 0.5).cpu()[rows])
        gold.append((batch["mm_labels"] > 0.5)[rows])
    if not predicted:
        raise MoetuneError("eval.metrics macro_f1: no eval example carries labels (data.labels_field)")
    return torch.cat(predicted), torch.cat(gold)


@torch.no_grad()
def paired_embeddings(
    model: nn.Module, batches: Iterable[dict[str, Any]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (N, D) of the first two modalities in the shared space, rows where both are present."""
    device = next(model.parameters()).device
    firsts, seconds = [], []
    for batch in batches:
        inputs = {
            k: v.to(device) for k, v in batch.items() if k not in ("labels", "mm_labels", "mm_label_mask")
        }
        out = model(**inputs)
        embeds = getattr(out, "modality_embeds", None)  # (B, M, D)
        if embeds is None or embeds.shape[1] < 2:
            raise MoetuneError("eval.metrics recall_at_1 needs a model with two or more modality encoders")
        present = out.modality_mask[:, :2].all(dim=1) if out.modality_mask is not None else slice(None)
        firsts.append(embeds[present, 0].float().cpu())
        seconds.append(embeds[present, 1].float().cpu())
    return torch.cat(firsts), torch.cat(seconds)


def task_metrics(
    model: nn.Module,
    batches: Sequence[dict[str, Any]],
    names: Sequence[str],
    tokenizer: Any,
    *,
    max_new_tokens: int = 32,
) -> dict[str, float]:
    """The task metrics `names` (of metrics.METRICS, `loss` excluded) of `model` on `batches`.

    `model` is the bare model (or PEFT model), not a DDP wrapper: generation calls its `generate`.
    Its train / eval mode is restored."""
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    try:
        if any(name in m.GENERATION_METRICS for name in names):
            predictions, references = generate_references(
                model, batches, tokenizer, max_new_tokens=max_new_tokens
            )
            if not references:
                raise MoetuneError(
                    "eval.metrics exact_match / word_accuracy: no eval example has a target to generate"
                )
            for name in m.GENERATION_METRICS:
                if name in names:
                    out[name] = getattr(m, name)(predictions, references)
        if "macro_f1" in names:
            out["macro_f1"] = m.macro_f1(*classification_predictions(model, batches))
        if "recall_at_1" in names:
            out["recall_at_1"] = m.recall_at_1(*paired_embeddings(model, batches))
    finally:
        model.train(was_training)
    return out
