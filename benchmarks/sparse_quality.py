"""Does hierarchical sparse attention learn as well as dense attention? Two checks on the tiny preset.

(a) code LM: the same tiny MoE model with dense and with hierarchical sparse attention in every layer,
    full fine-tuning (a plain AdamW loop) from the same seed for the same steps on Python source from
    the standard library (the `json` and `email` packages, found at run time), byte-level tokens
    (id = byte + 3; 0 pad, 1 bos, 2 eos). Reports the held-out loss on files never trained on.
(b) long-range retrieval: a value token stated right after a marker somewhere in the first half of a
    128-token sequence of random filler must be produced at the end, after a query marker: far beyond
    the 8-token local window, so only the global block summaries can carry it. The trained sparse
    model is also evaluated with its gate forced onto the local branch (global path cut): accuracy
    then falls to chance, which shows the information travels through the summaries.

    .venv/bin/python benchmarks/sparse_quality.py            # both parts, a few minutes each
    .venv/bin/python benchmarks/sparse_quality.py --quick    # a smoke run (tens of steps)

Writes benchmarks/results/sparse_quality.{json,md} (not in --quick mode).
"""

from __future__ import annotations

import argparse
import email
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import AutoModelForCausalLM  # noqa: E402

from finetune.modeling import preset_config  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PAD, BOS, EOS, OFFSET = 0, 1, 2, 3  # byte-level ids: byte b -> b + 3
VOCAB = 256 + OFFSET


def encode(text: bytes) -> list[int]:
    return [b + OFFSET for b in text]


def build_model(attention: str, seed: int):
    torch.manual_seed(seed)
    config = preset_config(
        "tiny", vocab_size=VOCAB, attention_type=attention, local_window=8, global_ratio=0.1
    )
    return AutoModelForCausalLM.from_config(config)


def train(model, batches, steps: int, lr: float, loss_fn) -> list[float]:
    """Plain AdamW with a linear warm-up; `batches()` yields input ids, `loss_fn(model, ids)` a loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    losses = []
    for step, ids in zip(range(steps), batches):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20)
        loss = loss_fn(model, ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    return losses


# ------------------------------------------------------------------------------------------ (a) code


def code_corpus() -> tuple[list[bytes], list[bytes]]:
    """The .py files of the json and email packages: every fifth file held out."""
    files = []
    for package in (json, email):
        files += sorted(Path(package.__file__).parent.rglob("*.py"))
    texts = [path.read_bytes() for path in files]
    held_out = texts[::5]
    train_texts = [text for i, text in enumerate(texts) if i % 5]
    return train_texts, held_out


def stream(texts: list[bytes]) -> torch.Tensor:
    ids = []
    for text in texts:
        ids += [BOS, *encode(text), EOS]
    return torch.tensor(ids)


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def code_part(steps: int, batch: int, length: int, seed: int) -> dict:
    train_texts, held_out = code_corpus()
    train_ids, eval_ids = stream(train_texts), stream(held_out)
    # fixed held-out windows, spread over the held-out files
    starts = torch.linspace(0, len(eval_ids) - length - 2, 48).long()
    eval_batch = torch.stack([eval_ids[s : s + length + 1] for s in starts])

    def batches():
        generator = torch.Generator().manual_seed(seed)  # the same data order for both models
        while True:
            starts = torch.randint(0, len(train_ids) - length - 1, (batch,), generator=generator)
            yield torch.stack([train_ids[s : s + length + 1] for s in starts])

    result = {"train_tokens": len(train_ids), "held_out_tokens": len(eval_ids), "steps": steps}
    for attention in ("dense", "hierarchical_sparse"):
        model = build_model(attention, seed)
        start = time.perf_counter()
        losses = train(model, batches(), steps, 3e-3, lm_loss)
        model.eval()
        with torch.no_grad():
            held = sum(lm_loss(model, eval_batch[i : i + 8]).item() for i in range(0, 48, 8)) / 6
        result[attention] = {
            "held_out_loss": held,
            "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
            "seconds": time.perf_counter() - start,
        }
        print(
            f"code  {attention:20s} held-out loss {held:.4f}  ({result[attention]['seconds']:.0f} s)",
            flush=True,
        )
    result["sparse_over_dense"] = (
        result["hierarchical_sparse"]["held_out_loss"] / result["dense"]["held_out_loss"]
    )
    return result


# ------------------------------------------------------------------------------------- (b) retrieval

VALUES = list(range(OFFSET, OFFSET + 16))  # 16 possible values: chance = 1/16
KEY_MARK, QUERY_MARK = OFFSET + 20, OFFSET + 21
FILLER = (OFFSET + 32, OFFSET + 128)


def retrieval_batch(batch: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[BOS, filler.., KEY_MARK, value, filler.., QUERY_MARK]; the answer is `value`."""
    ids = torch.randint(*FILLER, (batch, length), generator=generator)
    ids[:, 0], ids[:, -1] = BOS, QUERY_MARK
    where = torch.randint(1, length // 2, (batch,), generator=generator)
    values = torch.tensor(VALUES)[torch.randint(0, len(VALUES), (batch,), generator=generator)]
    rows = torch.arange(batch)
    ids[rows, where], ids[rows, where + 1] = KEY_MARK, values
    return ids, values


def answer_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]  # (B, V)


def retrieval_part(steps: int, batch: int, length: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    eval_ids, eval_values = retrieval_batch(512, length, torch.Generator().manual_seed(seed + 1))

    def batches():
        while True:
            yield retrieval_batch(batch, length, generator)

    def loss_fn(model, pair):
        ids, values = pair
        return F.cross_entropy(answer_logits(model, ids), values)

    def accuracy(model) -> float:
        model.eval()
        with torch.no_grad():
            hits = sum(
                (answer_logits(model, eval_ids[i : i + 64]).argmax(-1) == eval_values[i : i + 64])
                .sum()
                .item()
                for i in range(0, len(eval_ids), 64)
            )
        return hits / len(eval_ids)

    model = build_model("hierarchical_sparse", seed)
    start = time.perf_counter()
    losses = train(model, batches(), steps, 3e-3, loss_fn)
    result = {
        "steps": steps,
        "sequence_length": length,
        "value_distance": f"{length // 2 - 1}..{length - 3} tokens before the query",
        "chance": 1 / len(VALUES),
        "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
        "sparse_accuracy": accuracy(model),
        "seconds": time.perf_counter() - start,
    }
    with torch.no_grad():  # cut the global path: every layer's gate all on the local branch
        for layer in model.model.layers:
            layer.self_attn.mix_gate.weight.zero_()
            layer.self_attn.mix_gate.bias.copy_(torch.tensor([1e4, -1e4]))
    result["sparse_accuracy_global_path_cut"] = accuracy(model)
    print(
        f"retrieval  accuracy {result['sparse_accuracy']:.3f}, with the global path cut "
        f"{result['sparse_accuracy_global_path_cut']:.3f} (chance {result['chance']:.3f})",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few steps, nothing written")
    parser.add_argument("--part", choices=["code", "retrieval", "all"], default="all")
    parser.add_argument("--code-steps", type=int, default=400)
    parser.add_argument("--retrieval-steps", type=int, default=600)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 copes best with a busy machine)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    code_steps, retrieval_steps = (30, 30) if args.quick else (args.code_steps, args.retrieval_steps)

    results = {"torch": torch.__version__, "threads": args.threads, "seed": args.seed}
    if args.part in ("code", "all"):
        results["code"] = code_part(code_steps, batch=8, length=256, seed=args.seed)
    if args.part in ("retrieval", "all"):
        results["retrieval"] = retrieval_part(retrieval_steps, batch=32, length=128, seed=args.seed)
    print(json.dumps(results, indent=2))
    if args.quick:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    previous = RESULTS / "sparse_quality.json"
    merged = json.loads(previous.read_text()) if previous.exists() else {}
    merged.update(results)
    previous.write_text(json.dumps(merged, indent=2) + "\n")
    lines = []
    if "code" in merged:
        c = merged["code"]
        lines += [
            f"Code LM, {c['steps']} steps (batch 8 x 256 byte tokens), held-out loss on unseen stdlib files:",
            "",
            "| attention | held-out loss | sparse / dense |",
            "| --- | ---: | ---: |",
            f"| dense | {c['dense']['held_out_loss']:.4f} | |",
            f"| hierarchical_sparse | {c['hierarchical_sparse']['held_out_loss']:.4f} "
            f"| {c['sparse_over_dense']:.3f} |",
            "",
        ]
    if "retrieval" in merged:
        r = merged["retrieval"]
        lines += [
            f"Long-range retrieval, {r['steps']} steps, value {r['value_distance']} (local window 8):",
            "",
            "| model | accuracy |",
            "| --- | ---: |",
            f"| hierarchical_sparse | {r['sparse_accuracy']:.3f} |",
            f"| same model, global path cut | {r['sparse_accuracy_global_path_cut']:.3f} |",
            f"| chance | {r['chance']:.3f} |",
        ]
    (RESULTS / "sparse_quality.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
