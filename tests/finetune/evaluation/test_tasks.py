"""Task metrics on collated batches: prompt / reference split, batched greedy generation."""

from __future__ import annotations

import json

import pytest
import torch

from finetune.data import make_collator, prepare_datasets
from finetune.errors import MoetuneError
from finetune.evaluation.tasks import generate_references, split_prompt, task_metrics
from finetune.loading import load_model
from finetune.recipe import DataSection


def test_split_prompt_takes_the_input_before_the_first_label_and_the_labelled_span():
    ids = torch.tensor([1, 5, 6, 7, 8, 2, 0])
    labels = torch.tensor([-100, -100, -100, 7, 8, 2, -100])
    assert split_prompt(ids, labels) == ([1, 5, 6], [7, 8, 2])
    assert split_prompt(ids, torch.full_like(ids, -100)) is None


def _instruction_batches(tmp_path, tokenizer, batch_size=8):
    rows = [
        {"prompt": "What is 12 plus 30?", "response": "42"},
        {"prompt": "add", "response": "a + b"},
        {"prompt": "The quick brown fox", "response": "jumps"},
        {"prompt": "def add(a, b):", "response": "return a + b"},
        {"prompt": "add", "response": "the lazy dog"},
    ]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = DataSection(train=str(path), format="instruction", max_length=64)
    dataset = prepare_datasets(data, tokenizer, seed=0).train
    collate = make_collator(data, tokenizer)
    return [
        collate([dataset[i] for i in range(s, min(len(dataset), s + batch_size))])
        for s in range(0, len(dataset), batch_size)
    ]


def test_batched_generation_equals_one_prompt_at_a_time(tmp_path):
    """Rows are grouped by prompt length (no padding; the two "add" prompts share a generate call):
    the same text as generating each row alone."""
    model, tokenizer = load_model("preset:tiny")
    model.eval()
    batches = _instruction_batches(tmp_path, tokenizer)
    predictions, references = generate_references(model, batches, tokenizer, max_new_tokens=6)
    assert references == ["42", "a + b", "jumps", "return a + b", "the lazy dog"]
    alone = []
    for batch in batches:
        for row in range(batch["input_ids"].shape[0]):
            prompt, _ = split_prompt(batch["input_ids"][row], batch["labels"][row])
            out = model.generate(
                input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )  # fmt: skip
            new = out[0, len(prompt) :].tolist()
            if tokenizer.eos_token_id in new:
                new = new[: new.index(tokenizer.eos_token_id)]
            alone.append(tokenizer.decode(new, skip_special_tokens=True))
    assert predictions == alone


def test_generation_metrics_refuse_examples_without_a_prompt(tmp_path):
    model, tokenizer = load_model("preset:tiny")
    path = tmp_path / "text.jsonl"
    path.write_text(json.dumps({"text": "def add(a, b): return a + b"}) + "\n")
    data = DataSection(train=str(path), format="text", max_length=64)
    dataset = prepare_datasets(data, tokenizer, seed=0).train
    batches = [make_collator(data, tokenizer)([dataset[0]])]
    with pytest.raises(MoetuneError, match="no prompt before their target"):
        task_metrics(model, batches, ["exact_match"], tokenizer)
