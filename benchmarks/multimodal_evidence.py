"""Evidence that the multimodal model learns: the four mm-* recipes, before / after LoRA fine-tuning.

    python benchmarks/multimodal_evidence.py                  # all tasks (a few minutes each on 2 cores)
    python benchmarks/multimodal_evidence.py --task caption   # caption | audio | classify | align

Each task reads its recipe (recipes/mm-<task>.yaml: model modalities, adapter groups / rank, data
sources, steps, batch size, lr, seed), builds the tiny multimodal preset from its config with the
synthetic tokenizer, generates its data at run time (`synthetic:` sources), measures the metric on the
held-out set, attaches LoRA, trains with a plain AdamW loop (cosine schedule, the recipe's steps), and
measures again:
- caption (mm-caption): exact match of the greedy caption of held-out shapes images;
- audio (mm-audio): exact match of the greedy description of held-out tones / chords;
- classify (mm-classify): macro-F1 of the multi-label head on held-out MM-IMDB-style records, for
  text + image and for the text-only and image-only ablations (same recipe, one input left out);
- align (mm-align): retrieval recall@1 between held-out images and their (distinct) captions.

LoRA is attached with plain PEFT from the recipe's group names (`encoders`: every nn.Linear of the
encoders and the image encoder's Conv2d layers; `projector`: the multimodal glue fully trained as PEFT
`modules_to_save`; `attention` / `shared_experts` / `experts`: the decoder's, experts as PEFT
`target_parameters`), so the numbers do not depend on the training loop. Results go to
benchmarks/results/multimodal.json and .md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import finetune  # noqa: E402,F401  (registers the architecture)
from finetune.data.multimodal import build_multimodal_data, make_multimodal_collator  # noqa: E402
from finetune.data.synthetic_mm import synthetic_tokenizer  # noqa: E402
from finetune.modeling.multimodal import (  # noqa: E402
    MoetuneMultimodalForCausalLM,
    build_processor,
    multimodal_config,
)

TASKS = {"caption": "mm-caption", "audio": "mm-audio", "classify": "mm-classify", "align": "mm-align"}
GLUE = ("prefix_projector", "fusion_gate", "contrastive", "classifier")


# ----------------------------------------------------------------------------- LoRA from group names


def lora_config(model: MoetuneMultimodalForCausalLM, groups: list[str], r: int, alpha: int):
    """A plain PEFT LoraConfig for moetune's group names on the multimodal model."""
    from peft import LoraConfig

    modules, parameters, save = [], [], []
    for name, module in model.named_modules():
        parts = name.split(".")
        in_decoder = name.startswith("model.layers.")
        if (
            "attention" in groups
            and in_decoder
            and parts[-2] == "self_attn"
            and isinstance(module, torch.nn.Linear)
        ):
            modules.append(name)
        if (
            "shared_experts" in groups
            and in_decoder
            and "shared_experts" in parts
            and isinstance(module, torch.nn.Linear)
        ):
            modules.append(name)
        if "experts" in groups and in_decoder and parts[-1] == "experts":
            parameters += [f"{name}.gate_up_proj", f"{name}.down_proj"]
        if name in groups and isinstance(module, torch.nn.Linear):  # a raw module name, e.g. lm_head
            modules.append(name)
        encoder_layer = isinstance(module, torch.nn.Linear) or (
            len(parts) > 1 and parts[1] == "image" and isinstance(module, torch.nn.Conv2d)
        )
        if "encoders" in groups and name.startswith("encoders.") and encoder_layer:
            modules.append(name)
    if "projector" in groups:
        save = [f"projectors.{m}" for m in model.config.modalities] + [
            g for g in GLUE if getattr(model, g, None) is not None
        ]
    return LoraConfig(
        r=r, lora_alpha=alpha, target_modules=modules or None, target_parameters=parameters or None,
        modules_to_save=save or None,
    )  # fmt: skip


def attach_lora(model, adapter: dict):
    from peft import get_peft_model

    config = lora_config(model, adapter["targets"], adapter.get("r", 16), adapter.get("alpha", 32))
    with warnings.catch_warnings():  # PEFT 0.21 reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


# ----------------------------------------------------------------------------- metrics


def batches(dataset, collate, batch_size: int):
    for start in range(0, len(dataset), batch_size):
        yield collate([dataset[i] for i in range(start, min(len(dataset), start + batch_size))])


@torch.no_grad()
def exact_match(model, dataset, collate, processor) -> tuple[float, float, list[tuple[str, str]]]:
    """Greedy generation after the modality prefix: exact string match with the record's target, and the
    share of target words right at their place (colour / shape / position get partial credit)."""
    model.eval()
    hits, words, samples = 0, 0.0, []
    tok = processor.tokenizer
    for start in range(0, len(dataset), 50):
        idx = range(start, min(len(dataset), start + 50))
        batch = collate([dataset[i] for i in idx])
        prompt = torch.tensor([processor.prompt_ids("")] * len(idx))
        inputs = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels")}
        out = model.generate(input_ids=prompt, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, **inputs)  # fmt: skip
        for row, i in enumerate(idx):
            text = tok.decode(out[row, prompt.shape[1] :], skip_special_tokens=True).strip()
            target = dataset.records[i].target
            hits += text == target
            said, wanted = text.split(), target.split()
            words += sum(a == b for a, b in zip(said, wanted)) / len(wanted)
            if len(samples) < 4:
                samples.append((target, text))
    return hits / len(dataset), words / len(dataset), samples


@torch.no_grad()
def macro_f1(model, dataset, collate) -> float:
    model.eval()
    preds, golds = [], []
    for batch in batches(dataset, collate, 64):
        out = model(**{k: v for k, v in batch.items() if k not in ("mm_labels", "mm_label_mask")})
        preds.append(out.classification_logits.sigmoid() > 0.5)
        golds.append(batch["mm_labels"] > 0.5)
    pred, gold = torch.cat(preds), torch.cat(golds)
    tp = (pred & gold).sum(0).float()
    f1 = 2 * tp / (pred.sum(0) + gold.sum(0)).clamp(min=1)
    return float(f1.mean())


@torch.no_grad()
def recall_at_1(model, dataset, collate) -> dict[str, float]:
    model.eval()
    images, texts = [], []
    for batch in batches(dataset, collate, 64):
        out = model(**batch)
        images.append(torch.nn.functional.normalize(out.modality_embeds[:, 0].float(), dim=-1))
        texts.append(torch.nn.functional.normalize(out.modality_embeds[:, 1].float(), dim=-1))
    sim = torch.cat(images) @ torch.cat(texts).T  # (N, N)
    target = torch.arange(sim.shape[0])
    return {
        "image_to_text": float((sim.argmax(1) == target).float().mean()),
        "text_to_image": float((sim.argmax(0) == target).float().mean()),
    }


# ----------------------------------------------------------------------------- one run


def train(model, dataset, collate, steps: int, batch_size: int, lr: float, seed: int) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    model.train()
    losses, started = [], time.perf_counter()
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(dataset), generator=generator).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        out = model(**collate([dataset[i] for i in idx]))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    return {
        "steps": steps,
        "first_loss": round(sum(losses[:10]) / min(10, len(losses)), 4),
        "last_loss": round(sum(losses[-10:]) / min(10, len(losses)), 4),
        "train_seconds": round(time.perf_counter() - started, 1),
        "trainable_params": sum(p.numel() for p in params),
    }


def run(
    task: str, cache_dir: str, ignore: list[str] | None = None, steps: int | None = None,
    overrides: dict | None = None, config_overrides: dict | None = None,
) -> dict:  # fmt: skip
    recipe = yaml.safe_load((ROOT / "recipes" / f"{TASKS[task]}.yaml").read_text())
    for section, values in (overrides or {}).items():
        recipe[section] = {**recipe[section], **values}
    seed = recipe["train"].get("seed", 0)
    torch.manual_seed(seed)
    tokenizer = synthetic_tokenizer()
    config = multimodal_config("tiny", recipe["model"]["modalities"], **(config_overrides or {}))
    processor = build_processor(config, tokenizer)
    data_section = {
        **recipe["data"],
        "multimodal": {"cache_dir": cache_dir, "ignore_modalities": ignore or []},
    }
    data = build_multimodal_data(data_section, processor, seed=seed)
    collate = make_multimodal_collator(data_section, processor)
    model = MoetuneMultimodalForCausalLM(config)
    if data.label_names:
        model.set_label_names(data.label_names)

    def measure(m):
        if task in ("caption", "audio"):
            score, words, samples = exact_match(m, data.eval, collate, processor)
            return {"exact_match": round(score, 4), "word_accuracy": round(words, 4), "samples": samples}
        if task == "classify":
            return {"macro_f1": round(macro_f1(m, data.eval, collate), 4)}
        return {k: round(v, 4) for k, v in recall_at_1(m, data.eval, collate).items()}

    before = measure(model)
    peft_model = attach_lora(model, recipe["adapter"])
    stats = train(
        peft_model, data.train, collate, steps or recipe["train"]["max_steps"], recipe["train"]["batch_size"],
        recipe["train"]["lr"], seed,
    )  # fmt: skip
    after = measure(peft_model)
    return {
        "recipe": f"recipes/{TASKS[task]}.yaml",
        "modalities": recipe["model"]["modalities"],
        "ignored_inputs": ignore or [],
        "train_examples": len(data.train),
        "eval_examples": len(data.eval),
        "before": before,
        "after": after,
        **stats,
    }


# ----------------------------------------------------------------------------- report


def markdown(results: dict) -> str:
    lines = ["| task | metric | before | after | steps | train s |", "| --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        for metric, value in r["after"].items():
            if metric == "samples":
                continue
            lines.append(
                f"| {name} | {metric} | {r['before'][metric]:.3f} | {value:.3f} | {r['steps']} | {r['train_seconds']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=[*TASKS, "all"], default="all")
    parser.add_argument(
        "--steps", type=int, default=None, help="override the recipe's max_steps (smoke runs)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)"
    )
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "multimodal"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tasks = list(TASKS) if args.task == "all" else [args.task]
    output = Path(args.output)
    results = (
        json.loads(output.with_suffix(".json").read_text()) if output.with_suffix(".json").exists() else {}
    )
    with tempfile.TemporaryDirectory() as cache:
        for task in tasks:
            started = time.perf_counter()
            results[task] = run(task, cache, steps=args.steps)
            if task == "classify":
                results["classify-text-only"] = run(task, cache, ["image"], steps=args.steps)
                results["classify-image-only"] = run(task, cache, ["text"], steps=args.steps)
            print(f"{task}: {time.perf_counter() - started:.0f} s", flush=True)
            print(markdown({k: v for k, v in results.items() if k.startswith(task)}), flush=True)
    results_meta = {
        "command": "python benchmarks/multimodal_evidence.py --task " + args.task,
        "torch_threads": args.threads,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps({**results, "_meta": results_meta}, indent=2) + "\n")
    output.with_suffix(".md").write_text(
        markdown({k: v for k, v in results.items() if not k.startswith("_")}) + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
