"""Loss / perplexity, routing statistics, and the expert profile behind ESFT selection.

- `evaluate_loss`: next-token loss normalised by the number of real label tokens (labels == -100
  ignored), so batches of different lengths weigh by their tokens, not by the batch;
  `evaluate_multimodal_losses`: the same for encoder-only batches (contrastive, classification);
- `routing_stats`: per MoE layer, how many routed slots each expert received, its token selection
  ratio and its average gate score, read at the experts modules' inputs (the same place in every
  transformers family and in the built-in model, with or without adapters);
- `profile_experts`: `moetune experts profile`: runs text through a model, writes the statistics
  (JSON), a heatmap of expert load per layer (PNG) and an ESFT selection (selection.json) that
  `adapter.experts` accepts.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.errors import MoetuneError
from finetune.losses import count_label_tokens, lm_loss_sum, multimodal_losses

# ----------------------------------------------------------------------------- loss


def _model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Mean next-token cross-entropy over all real label tokens of `batches`, and its perplexity.

    Each batch holds the model inputs and `labels` (B, T) aligned with `input_ids` (the model shifts
    by one, as transformers does); positions labelled -100 do not count. The loss is summed over
    every batch and divided once by the total number of counted tokens.
    Returns {"loss", "perplexity", "tokens"}; the model's train / eval mode is restored.
    """
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for batch in batches:
            logits = model(**_model_inputs(batch), use_cache=False).logits  # (B, T', V)
            total += float(lm_loss_sum(logits, batch["labels"]))
            tokens += count_label_tokens(batch["labels"])
    finally:
        model.train(was_training)
    loss = total / tokens if tokens else float("nan")
    return {"loss": loss, "perplexity": _perplexity(loss), "tokens": tokens}


@torch.no_grad()
def evaluate_multimodal_losses(model: nn.Module, batches: list[dict[str, Any]]) -> dict[str, float]:
    """Mean weighted contrastive + classification loss per example over encoder-only `batches`."""
    was_training = model.training
    model.eval()
    total, examples = 0.0, 0
    try:
        for batch in batches:
            losses = multimodal_losses(model(**batch), model)
            size = next(iter(batch.values())).shape[0]
            if losses is not None:
                total, examples = total + float(losses) * size, examples + size
    finally:
        model.train(was_training)
    return {"loss": total / examples if examples else float("nan"), "tokens": examples}


def eval_batches(dataset: Any, collate: Any, batch_size: int, limit: int | None) -> list[dict[str, Any]]:
    """A run's eval batches, fixed for the whole run (the same before, during and after training).

    Collated with a generator of their own, so the seeded global RNG (LoRA's initialisation) is left
    as it was."""
    if dataset is None:
        return []
    from torch.utils.data import DataLoader

    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=collate, generator=torch.Generator()
    )
    batches = []
    for batch in loader:
        batches.append(batch)
        if limit is not None and len(batches) >= limit:
            break
    return batches


def evaluate_across_processes(
    acc: Any, model: nn.Module, batches: list[dict[str, Any]], *, lm: bool
) -> dict[str, float]:
    """Loss and perplexity on `batches`, each process taking its share, weighted by tokens.

    `lm`: batches with text targets, the token-normalised LM loss; else encoder-only batches
    (alignment, classification), the model's weighted contrastive + classification loss per example.
    """
    from finetune.reporting import perplexity

    mine = batches[acc.process_index :: acc.num_processes]
    rounds = math.ceil(len(batches) / acc.num_processes)
    was_training = model.training
    measure = evaluate_loss if lm else evaluate_multimodal_losses
    result = measure(model, [_to_device(b, acc.device) for b in mine]) if mine else {"loss": 0.0, "tokens": 0}
    if len(mine) < rounds:  # sharded models need every process in every forward: one discarded extra
        measure(model, [_to_device(batches[0], acc.device)])
    model.train(was_training)
    tokens = torch.tensor(float(result["tokens"]), device=acc.device)
    weighted = torch.tensor(
        float(result["loss"]) * result["tokens"] if result["tokens"] else 0.0, device=acc.device
    )
    total = float(acc.reduce(tokens, "sum").item())
    loss = float(acc.reduce(weighted, "sum").item()) / max(total, 1.0)
    return {"loss": loss, "perplexity": perplexity(loss) if lm else float("nan"), "tokens": total}


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _perplexity(loss: float) -> float:
    if math.isnan(loss):
        return float("nan")
    return math.exp(min(loss, 50.0))  # beyond e^50 the number says nothing more


# ----------------------------------------------------------------------------- routing


def expert_call_sites(model: nn.Module) -> list[tuple[int, nn.Module, int]]:
    """(layer index, the module that is called with the routing, num experts) per MoE layer.

    That module is the experts module itself, or the outermost PEFT ParamWrapper around it (the
    one that receives `(hidden_states, top_k_index, top_k_weights)`).
    """
    from adapters.targets import fused_expert_weights, shape_of

    sites, inside = [], set()
    for name, module in model.named_modules():
        if id(module) in inside:
            continue
        chain = [module]
        while isinstance(getattr(chain[-1], "base_layer", None), nn.Module):
            chain.append(chain[-1].base_layer)
        base = chain[-1]
        fused = fused_expert_weights(base)  # float stacks, or quantized ones
        if not fused or name.rsplit(".", 1)[-1] != "experts":
            continue
        inside.update(id(m) for m in chain)
        match = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
        experts = shape_of(getattr(base, fused[0][0]))[0]
        sites.append((int(match[1]) if match else len(sites), module, experts))
    return sites


@torch.no_grad()
def routing_stats(model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Per MoE layer: routed slots per expert, token selection ratio and average gate score.

    Returns {"layers": [layer indices], "num_experts", "top_k", "tokens": real tokens seen,
    "counts": [[slots per expert] per layer], "token_ratio": [[counts / tokens]] (sums to top_k),
    "gate_score": [[sum of the expert's routing weights / tokens]] (ESFT's average gate score;
    zero where the expert was not chosen)}. Padding (attention_mask == 0) is not counted.
    """
    sites = expert_call_sites(model)
    if not sites:
        raise MoetuneError(f"{type(model).__name__} has no routed experts to profile")
    counts = [torch.zeros(e, dtype=torch.float64) for _, _, e in sites]
    gates = [torch.zeros(e, dtype=torch.float64) for _, _, e in sites]
    seen = [0] * len(sites)
    state: dict[str, Any] = {"mask": None, "top_k": 0}

    def make_hook(i: int, num_experts: int):
        def hook(module, args, kwargs):
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]  # (N, k)
            weights = args[2] if len(args) > 2 else kwargs["top_k_weights"]  # (N, k)
            mask = state["mask"]
            if mask is not None and mask.numel() == index.shape[0]:
                mask = mask.to(index.device)
                index, weights = index[mask], weights[mask]
            state["top_k"] = index.shape[-1]
            flat = index.reshape(-1).cpu()
            counts[i] += torch.bincount(flat, minlength=num_experts)[:num_experts].double()
            gates[i].index_add_(0, flat, weights.reshape(-1).double().cpu())
            seen[i] += index.shape[0]

        return hook

    handles = [
        m.register_forward_pre_hook(make_hook(i, e), with_kwargs=True) for i, (_, m, e) in enumerate(sites)
    ]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            mask = batch.get("attention_mask")
            state["mask"] = None if mask is None else mask.reshape(-1).bool()
            model(**_model_inputs(batch), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    tokens = [max(n, 1) for n in seen]
    return {
        "layers": [layer for layer, _, _ in sites],
        "num_experts": sites[0][2],
        "top_k": state["top_k"],
        "tokens": seen[0],
        "counts": [c.tolist() for c in counts],
        "token_ratio": [(c / n).tolist() for c, n in zip(counts, tokens)],
        "gate_score": [(g / n).tolist() for g, n in zip(gates, tokens)],
    }


def expert_load_shares(
    model: nn.Module, batches: list[dict[str, Any]], device: torch.device
) -> list[list[float]]:
    """Per MoE layer, the share of the routed tokens of `batches` each expert received."""
    stats = routing_stats(model, [_to_device(b, device) for b in batches])
    rows = []
    for row in stats["counts"]:
        row = torch.as_tensor(row, dtype=torch.float64)
        rows.append((row / row.sum().clamp_min(1e-12)).tolist())
    return rows


# ----------------------------------------------------------------------------- profile


def read_texts(data: str | Path, max_examples: int | None = None) -> list[str]:
    """Texts of `--data`, read by the same rules as a recipe's `data.train` (finetune.data.load_source):
    .jsonl / .json / .csv / .parquet records with a "text" field, a text or code file, a folder of them."""
    from finetune.data.sources import load_source

    records = load_source(str(data), what="--data")
    if "text" not in records.column_names:
        raise MoetuneError(
            f"--data {data}: records have no 'text' field (fields: {', '.join(records.column_names)}); "
            "give records with a 'text' field, or text / code files"
        )
    texts = [t for t in records["text"] if isinstance(t, str) and t.strip()]
    if not texts:
        raise MoetuneError(f"--data {data}: no text found")
    return texts[:max_examples] if max_examples is not None else texts


def _batches(tokenizer, texts: list[str], max_length: int, max_examples: int, device) -> list[dict]:
    """Texts cut into examples of at most `max_length` tokens (a long document is not truncated to
    its first window), `max_examples` at most, one per batch: no padding, every routed token is real."""
    batches = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        for start in range(0, len(ids), max_length):
            chunk = ids[start : start + max_length]
            if len(chunk) < 2:
                continue
            input_ids = torch.tensor([chunk], device=device)
            batches.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)})
            if len(batches) >= max_examples:
                return batches
    return batches


@dataclass
class ExpertProfile:
    """What `moetune experts profile` did: the tokens it routed, what it selected, the files it wrote."""

    tokens: int
    examples: int
    layers: int  # MoE layers
    experts: int  # routed experts in all of them
    selected: int  # experts in the selection
    metric: str
    threshold: float
    files: list[Path]  # expert_stats.json, expert_load.png, selection.json

    def __str__(self) -> str:
        return (
            f"profiled {self.tokens} tokens ({self.examples} examples) over {self.layers} MoE layers; "
            f"selected {self.selected} of {self.experts} experts ({self.metric} >= {self.threshold} per layer); "
            f"wrote {', '.join(map(str, self.files))}"
        )


def profile_experts(
    model_spec: str,
    data: str | Path,
    output: str | Path,
    threshold: float = 0.2,
    metric: str = "token_ratio",
    max_examples: int = 256,
    max_length: int = 512,
    quantize: str | None = None,
) -> ExpertProfile:
    """`moetune experts profile`: routing statistics + heatmap + ESFT selection; returns what it did.

    `quantize` profiles the model with its routed experts int8 / nf4 (as a quantized run trains it)."""
    from adapters.selection import METRICS, select_experts
    from finetune import load_model

    if metric not in METRICS:
        raise MoetuneError(f"--metric {metric!r} is not one of {', '.join(METRICS)}")
    if max_examples < 1 or max_length < 2:
        raise MoetuneError("--max-examples must be >= 1 and --max-length >= 2")
    texts = read_texts(data, max_examples)
    model, tokenizer = load_model(model_spec, quantize=quantize)
    if tokenizer is None:
        raise MoetuneError(f"{model_spec}: no tokenizer found next to the model; profile needs one")
    device = next(model.parameters()).device
    batches = _batches(tokenizer, texts, max_length, max_examples, device)
    if not batches:
        raise MoetuneError(f"--data {data}: every text is shorter than 2 tokens")
    stats = routing_stats(model, batches)
    scores = dict(zip(stats["layers"], stats[metric]))
    selection = select_experts(scores, threshold)

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    stats_doc = {"model": str(model_spec), "data": str(data), "examples": len(batches), **stats}
    (out / "expert_stats.json").write_text(json.dumps(stats_doc, indent=1) + "\n")
    selection_doc = {
        "model": str(model_spec),
        "data": str(data),
        "metric": metric,
        "threshold": threshold,
        "layers": {str(layer): ids for layer, ids in selection.items()},
    }
    (out / "selection.json").write_text(json.dumps(selection_doc, indent=2) + "\n")
    title = f"{model_spec}: expert load on {Path(data).name}; selected (p={threshold}, {metric}) outlined"
    _heatmap(stats, selection, out / "expert_load.png", title=title)
    return ExpertProfile(
        tokens=stats["tokens"],
        examples=len(batches),
        layers=len(stats["layers"]),
        experts=len(stats["layers"]) * stats["num_experts"],
        selected=sum(len(v) for v in selection.values()),
        metric=metric,
        threshold=threshold,
        files=[out / "expert_stats.json", out / "expert_load.png", out / "selection.json"],
    )


def profile_figure(stats: dict[str, Any], selection: dict[int, list[int]], title: str):
    """Expert load per layer (share of routed slots) with the selected experts outlined in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from finetune.plots import label_expert_axis

    load = torch.tensor(stats["token_ratio"]) / max(stats["top_k"], 1)  # (layers, experts); rows sum to 1
    fig, ax = plt.subplots(figsize=(min(16, max(6, 2 + 0.12 * load.shape[1])), 1.5 + 0.4 * load.shape[0]))
    image = ax.imshow(load.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    rows = {layer: row for row, layer in enumerate(stats["layers"])}
    cells = [(expert, rows[layer]) for layer, ids in selection.items() if layer in rows for expert in ids]
    if cells:
        xs, ys = zip(*cells)
        ax.scatter(
            xs,
            ys,
            marker="s",
            s=60,
            facecolors="none",
            edgecolors="red",
            linewidths=1.2,
            label=f"selected ({len(cells)})",
        )
        ax.legend(loc="upper right", fontsize=7, framealpha=0.8)
    label_expert_axis(ax, load.shape[1])
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(stats["layers"])), [str(v) for v in stats["layers"]])
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="share of routed tokens")
    fig.tight_layout()
    return fig


def _heatmap(stats: dict[str, Any], selection: dict[int, list[int]], path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig = profile_figure(stats, selection, title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
