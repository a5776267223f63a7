"""The training loop behind `moetune train RECIPE.yaml`: one Accelerate loop, read top to bottom.

    setup    Accelerator, base model + LoRA, data, AdamW on the trainable parameters, schedule,
             trackers; `--resume` restores the last checkpoint
    train    each optimizer step takes `grad_accum` micro-batches per process; eval, logging and
             checkpoints every N steps, and one at the end; Ctrl-C / SIGTERM saves one and stops
    save     adapter/ (PEFT + model card + recipe + metrics), metrics.json, plots, recipe.yaml; push
    cleanup  close the trackers, release the process group

Loss normalisation. The loss of one optimizer step is the sum of the token losses of all its
micro-batches on all processes, divided by the GLOBAL count of label tokens of that step (gathered
before the first forward), so padding, uneven examples, accumulation and the number of processes
never change the gradient: 2 processes x batch 4 equals 1 process x batch 4 x grad_accum 2. The
MoE load-balancing loss (`aux_loss`, when the model returns it) is averaged over the micro-batches
and added with the model's own `router_aux_loss_coef`.

Exact resume. A checkpoint holds the trainable weights, the optimizer, the scheduler and the step
counter; data order is a pure function of (train.seed, epoch) and dropout is reseeded from
(train.seed, step, process) before every step, so a run resumed from step k replays steps k+1..N
exactly as the uninterrupted run did (the fault tests compare the final adapters tensor by tensor).
A run folder is never silently reused: continuing needs `--resume`, replacing needs `--overwrite`.

Several processes. `launch_training(..., num_processes=N)` re-launches itself through
`accelerate launch`; `accelerate launch --config_file recipes/accelerate/ddp.yaml cli.py train R.yaml`
works as well. Only the main process writes files.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from finetune import checkpoint as ckpt
from finetune.accelerator import (
    TRACKER_PROJECT,
    check_engine,
    end_training,
    make_accelerator,
)
from finetune.errors import MoetuneError
from finetune.launch import inside_distributed_launch, launch_run
from finetune.losses import count_label_tokens, forward_loss, micro_batch_loss
from finetune.reporting import (
    ExpertLoad,
    LogWindow,
    RunMetrics,
    TrainResult,
    input_token_count,
    perplexity,
    tracker_config,
    write_card,
    write_history,
    write_plots,
)
from finetune.resume import EpochSampler, RunState, check_run_folder, fingerprint, step_seed

# ============================================================================= public entry


def launch_training(
    recipe: Any,
    *,
    overrides: Sequence[str] = (),
    output_dir: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    num_processes: int = 1,
    debug: bool = False,
) -> TrainResult | None:
    """Train the LoRA adapter a recipe describes; returns the run's result (`str()` is its summary).

    `recipe` is a YAML path, a bundled recipe name or a `Recipe`; `overrides` are `section.key=value`.
    A run folder that already holds checkpoints or an adapter needs `resume` (continue it) or
    `overwrite` (replace it). Processes other than the main one, and a launch of several processes
    (whose main process reports), return None.
    """
    from finetune.recipe import Recipe

    if num_processes < 1:
        raise MoetuneError(f"--num-processes must be >= 1, got {num_processes}")
    if resume and overwrite:
        raise MoetuneError(
            "--resume and --overwrite both given; --resume continues a run, --overwrite replaces it"
        )
    if isinstance(recipe, Recipe):
        if overrides:
            raise MoetuneError("pass overrides with a recipe file, not with a Recipe object")
        resolved = recipe
    else:
        from finetune.recipe import load_recipe

        resolved = load_recipe(str(recipe), overrides)  # validate before starting any process
    run_dir = Path(output_dir or resolved.output.dir).expanduser()
    if num_processes > 1 and not inside_distributed_launch():
        return launch_run(
            resolved, run_dir, num_processes=num_processes, resume=resume, overwrite=overwrite, debug=debug
        )
    run = TrainingRun(resolved, output_dir=run_dir, resume=resume, overwrite=overwrite)
    try:
        run.setup()
        run.train()
        return run.save()
    finally:
        run.cleanup()


# ============================================================================= the run


class TrainingRun:
    """One training run; the four phases below are the whole story."""

    def __init__(
        self,
        recipe: Any,
        *,
        output_dir: str | os.PathLike | None = None,
        resume: bool = False,
        overwrite: bool = False,
    ):
        self.recipe = recipe
        self.run_dir = Path(output_dir or recipe.output.dir).expanduser()
        self.resume, self.overwrite = resume, overwrite
        self.accelerator = None
        self.last_saved_step: int | None = None  # the step of the newest checkpoint on disk
        self.state = RunState(fingerprint=fingerprint(recipe))

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        from accelerate.utils import DistributedType, set_seed
        from torch.utils.data import DataLoader

        from adapters import apply_lora
        from adapters.experts import set_experts_backend
        from adapters.targets import count_trainable, target_report
        from finetune.data import build_datasets, make_collator
        from finetune.evaluate import expert_call_sites
        from finetune.loading import load_model
        from finetune.recipe import save_recipe

        r, t = self.recipe, self.recipe.train
        self.accelerator = acc = make_accelerator(r, self.run_dir)
        check_engine(acc, t)
        checkpoint = check_run_folder(self.run_dir, r, resume=self.resume, overwrite=self.overwrite)
        if self.resume and checkpoint is None:
            acc.print(f"--resume: no checkpoint in {self.run_dir}; starting at step 0")
        for line in getattr(r, "warnings", ()):  # overrides that replaced a key of the recipe file
            self.say(line, err=True)
        for line in getattr(r, "notes", ()):  # defaults relied on, sample data found in the installation
            self.say(line)

        # Model: the same seed on every process, so randomly initialised parts agree.
        set_seed(t.seed)
        model, self.tokenizer = load_model(
            r.model.name,
            dtype=r.model.dtype,
            trust_remote_code=r.model.trust_remote_code,
            allow_pickle=r.model.allow_pickle,
            modalities=r.model.modalities or None,
            quantize=r.model.quantize,
        )
        if r.model.gradient_checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x name
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        self.base_config = model.config
        train_ds, eval_ds = build_datasets(r.data, self.tokenizer, seed=t.seed)
        label_names = getattr(train_ds, "label_names", None) or getattr(self.tokenizer, "label_names", None)
        if label_names and hasattr(model, "set_label_names"):
            # Multi-label head sized and ordered by the data, before LoRA so the adapter can train it.
            model.set_label_names(list(label_names))
        self.model = apply_lora(model, **dataclasses.asdict(r.adapter))
        self.trainable_params = count_trainable(self.model)  # as the report counts (ESFT: chosen experts)
        self.total_params = sum(p.numel() for p in self.model.parameters())
        acc.print(target_report(self.model))
        self.routes = getattr(self.base_config, "output_router_logits", None) is not None  # returns aux loss
        self.has_experts = bool(expert_call_sites(self.model))
        self.aux_coef = float(getattr(self.base_config, "router_aux_loss_coef", 0.0) or 0.0)

        # Data: a sampler whose order depends only on (seed, epoch), sharded over processes by prepare.
        collate = make_collator(r.data, self.tokenizer)
        self.sampler = EpochSampler(train_ds, r.data, batch_size=t.batch_size, seed=t.seed)
        train_dl = DataLoader(train_ds, batch_size=t.batch_size, sampler=self.sampler, collate_fn=collate)
        self.eval_batches = _first_batches(eval_ds, collate, t.batch_size, t.eval_batches)
        self.eval_is_lm = any("labels" in b for b in self.eval_batches)

        # Optimizer on the trainable parameters only; schedule over the whole run.
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        self.model, self.optimizer, self.train_dl = acc.prepare(self.model, optimizer, train_dl)
        set_experts_backend(self.model, r.model.experts_backend)  # on the device now: "grouped" checks it
        self.steps_per_epoch = math.ceil(len(self.train_dl) / t.grad_accum)
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        self.scheduler = acc.prepare(make_scheduler(t, optimizer, self.total_steps))
        # Checkpoints keep only the trainable weights: the base comes back from MODEL on resume.
        acc.register_save_state_pre_hook(ckpt.trainable_state_filter(acc.unwrap_model(self.model)))
        self.checkpoint_bytes = ckpt.estimate_checkpoint_bytes(
            acc.unwrap_model(self.model), frozen_too=acc.distributed_type == DistributedType.FSDP
        )

        if acc.is_main_process:
            if self.overwrite:  # only now, once model and data loaded: a failed start keeps the old run
                removed = ckpt.remove_run_outputs(self.run_dir)
                if removed:
                    self.say(
                        f"--overwrite: removed the previous run's {', '.join(removed)} in {self.run_dir}"
                    )
            ckpt.clean_stale(self.run_dir / ckpt.CHECKPOINTS)
            save_recipe(r, self.run_dir / "recipe.yaml")
        acc.init_trackers(TRACKER_PROJECT, config=tracker_config(r))
        if checkpoint is not None:
            self._restore(checkpoint)
        acc.wait_for_everyone()

    def _restore(self, checkpoint: Path) -> None:
        state = RunState.from_dict(ckpt.load_checkpoint(self.accelerator, checkpoint, self.model))
        state.resumed_at.append(state.step)
        self.state = state
        self.last_saved_step = state.step
        left = max(self.total_steps - state.step, 0)
        self.accelerator.print(
            f"resumed from {checkpoint} (step {state.step} of {self.total_steps}; {left} step(s) to run)"
        )

    # ------------------------------------------------------------------ train

    def train(self) -> None:
        from tqdm.auto import tqdm

        acc = self.accelerator
        if self.state.step == 0 and self.eval_batches:
            before = self.evaluate()
            self.state.eval_loss_before = before["loss"]
            self.state.expert_load_before = self.expert_load()
            self.log({"eval/loss": before["loss"], "eval/perplexity": before["perplexity"]}, 0)
        self.progress = progress = tqdm(
            total=self.total_steps,
            initial=self.state.step,
            desc="train",
            unit="step",
            disable=not acc.is_local_main_process,
            dynamic_ncols=True,
        )
        window = LogWindow()
        load = ExpertLoad()
        self.model.train()
        with ckpt.InterruptGuard() as interrupts:
            self._loop(window, load, interrupts)
        progress.close()
        if self.state.step != self.last_saved_step:  # the end is always resumable
            self.save_checkpoint(self.state.step)
        if self.eval_batches:
            self.run_eval(self.state.step)

    def _loop(self, window: LogWindow, load: ExpertLoad, interrupts: ckpt.InterruptGuard) -> None:
        """Optimizer steps from the current one to the last; stops with a checkpoint on Ctrl-C."""
        from accelerate import skip_first_batches

        acc, t, progress = self.accelerator, self.recipe.train, self.progress
        while self.state.step < self.total_steps:
            epoch, first_update = divmod(self.state.step, self.steps_per_epoch)
            # Through the prepared loader: Accelerate's own epoch counter re-sets the sampler's epoch each
            # time the loader is iterated, and it only advances when an iteration runs to exhaustion.
            self.train_dl.set_epoch(epoch)
            skip = first_update * t.grad_accum  # micro-batches this process already used this epoch
            batches = iter(skip_first_batches(self.train_dl, skip) if skip else self.train_dl)
            for update in range(first_update, self.steps_per_epoch):
                count = min(t.grad_accum, len(self.train_dl) - update * t.grad_accum)
                micro_batches = [next(batches) for _ in range(count)]
                step = self.state.step + 1
                torch.manual_seed(step_seed(t.seed, step, acc.process_index))  # dropout: resumable
                started = time.perf_counter()
                result = self.train_step(micro_batches, step, load)
                seconds = time.perf_counter() - started
                self.state.step = step
                self.state.tokens += result["tokens"]
                self.state.train_seconds += seconds
                window.add(result, seconds)
                progress.update(1)
                if step % t.log_every == 0 or step == self.total_steps:
                    logged = window.flush() | load.flush(acc) | {"train/lr": self.scheduler.get_last_lr()[0]}
                    self.log(logged, step)
                    progress.set_postfix(
                        loss=f"{logged['train/loss']:.4f}",
                        lr=f"{logged['train/lr']:.2e}",
                        tok_s=f"{logged['train/tokens_per_second']:.0f}",
                    )
                if (
                    t.eval_every
                    and step % t.eval_every == 0
                    and step != self.total_steps
                    and self.eval_batches
                ):
                    self.run_eval(step)
                if t.save_every and step % t.save_every == 0 and step != self.total_steps:
                    self.save_checkpoint(step)
                ckpt.failpoint("after-step", step)
                if step >= self.total_steps:
                    return
                signum = interrupts.requested(acc)
                if signum is not None:
                    self._stop_on_interrupt(step, signum)

    def _stop_on_interrupt(self, step: int, signum: int) -> None:
        """Save a resumable checkpoint of the finished `step` (unless there is one) and stop."""
        self.progress.close()
        if step != self.last_saved_step:
            self.save_checkpoint(step)
        if not self.accelerator.is_main_process:  # the main process says it, once
            raise SystemExit(128 + signum)
        name = signal.Signals(signum).name
        latest = ckpt.latest_checkpoint(self.run_dir)
        raise ckpt.TrainingInterrupted(
            f"training interrupted by {name} after step {step} of {self.total_steps}; checkpoint saved in "
            f"{latest}; {ckpt.RESUME_HINT}",
            signum,
        )

    def train_step(self, micro_batches: list[dict], step: int, load: ExpertLoad) -> dict[str, float]:
        """One optimizer step over `micro_batches`; the loss is normalised by the global token count."""
        acc, t = self.accelerator, self.recipe.train
        local = sum(count_label_tokens(b["labels"]) for b in micro_batches if "labels" in b)
        global_tokens = int(acc.reduce(torch.tensor(local, device=acc.device), "sum").item())
        denominator = max(global_tokens, 1)
        loss_sum = torch.zeros((), device=acc.device)
        aux_sum = torch.zeros((), device=acc.device)
        multimodal_sum = torch.zeros((), device=acc.device)
        seen = 0
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with _maybe(not last, acc.no_sync, self.model):  # gradients are all-reduced once, at the end
                out = forward_loss(self.model, batch, routes=self.routes)
                loss = micro_batch_loss(
                    out,
                    label_tokens=global_tokens,
                    num_processes=acc.num_processes,
                    aux_coef=self.aux_coef,
                    micro_batches=len(micro_batches),
                )
                acc.backward(loss)
            loss_sum += out.loss_sum.detach().float()
            if out.aux_loss is not None:
                aux_sum += out.aux_loss.detach().float()
            if out.multimodal_loss is not None:
                multimodal_sum += out.multimodal_loss.detach().float()
            seen += input_token_count(batch)
            load.add(out.router_logits, batch, top_k=getattr(self.base_config, "num_experts_per_tok", None))

        max_norm = t.max_grad_norm if t.max_grad_norm else float("inf")
        norm = acc.clip_grad_norm_(self.model.parameters(), max_norm)  # None: DeepSpeed before its first step
        grad_norm = _as_float(norm) if norm is not None else float("nan")
        train_loss = float(acc.reduce(loss_sum, "sum").item()) / denominator
        # Token-normalised LM loss plus the (batch-mean) contrastive / classification terms, if any.
        train_loss += float(acc.reduce(multimodal_sum, "mean").item()) / len(micro_batches)
        aux = float(acc.reduce(aux_sum, "mean").item()) / len(micro_batches)
        tokens = int(acc.reduce(torch.tensor(seen, device=acc.device), "sum").item())
        # fp16 overflows are the GradScaler's business (it skips the step); NaN loss never is.
        bad_grads = acc.scaler is None and norm is not None and not math.isfinite(grad_norm)
        if not math.isfinite(train_loss) or bad_grads:
            what = f"loss {train_loss}" if not math.isfinite(train_loss) else f"gradient norm {grad_norm}"
            if t.nan_policy == "stop":
                last = ckpt.latest_checkpoint(self.run_dir)
                raise MoetuneError(
                    f"training stopped at step {step}: {what} is not finite; nothing of this step was saved "
                    f"(last good checkpoint: {last or 'none'}); lower train.lr, check the data, or set "
                    "train.nan_policy: skip"
                )
            self.say(f"step {step}: {what} is not finite; skipping this step (train.nan_policy: skip)")
            self.state.skipped_steps.append(step)
            if acc.scaler is not None:  # fp16: the GradScaler sees the non-finite gradients and skips
                self.optimizer.step()  # the update itself, keeping its own state consistent
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            return {"loss": float("nan"), "aux_loss": aux, "grad_norm": grad_norm, "tokens": tokens}
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.train_loss.append([step, train_loss])
        return {"loss": train_loss, "aux_loss": aux, "grad_norm": grad_norm, "tokens": tokens}

    def evaluate(self) -> dict[str, float]:
        """Loss and perplexity on the eval batches, each process taking its share (weighted by tokens)."""
        from finetune.evaluate import evaluate_loss, evaluate_multimodal_losses

        acc = self.accelerator
        mine = self.eval_batches[acc.process_index :: acc.num_processes]
        rounds = math.ceil(len(self.eval_batches) / acc.num_processes)
        device_batches = [_to_device(b, acc.device) for b in mine]
        was_training = self.model.training
        # Batches with text targets: token-normalised LM loss. Encoder-only batches (alignment,
        # classification): the model's weighted contrastive + classification loss, per example.
        measure = evaluate_loss if self.eval_is_lm else evaluate_multimodal_losses
        result = measure(self.model, device_batches) if device_batches else {"loss": 0.0, "tokens": 0}
        if len(mine) < rounds:  # sharded models need every process in every forward: one discarded extra
            measure(self.model, [_to_device(self.eval_batches[0], acc.device)])
        self.model.train(was_training)
        tokens = torch.tensor(float(result["tokens"]), device=acc.device)
        weighted = torch.tensor(
            float(result["loss"]) * result["tokens"] if result["tokens"] else 0.0, device=acc.device
        )
        total = float(acc.reduce(tokens, "sum").item())
        loss = float(acc.reduce(weighted, "sum").item()) / max(total, 1.0)
        return {
            "loss": loss,
            "perplexity": perplexity(loss) if self.eval_is_lm else float("nan"),
            "tokens": total,
        }

    def expert_load(self) -> list[list[float]] | None:
        """Share of routed tokens per expert per MoE layer on the eval batches (None for dense models)."""
        from finetune.evaluate import routing_stats

        if not self.has_experts or not self.eval_batches:
            return None
        was_training = self.model.training
        batches = [_to_device(b, self.accelerator.device) for b in self.eval_batches]
        stats = routing_stats(self.model, batches)
        self.model.train(was_training)
        return _load_shares(stats)

    def run_eval(self, step: int) -> None:
        result = self.evaluate()
        self.state.eval_loss.append([step, result["loss"]])
        self.log({"eval/loss": result["loss"], "eval/perplexity": result["perplexity"]}, step)
        self.say(f"step {step}: eval loss {result['loss']:.4f} (perplexity {result['perplexity']:.2f})")

    def save_checkpoint(self, step: int) -> None:
        acc = self.accelerator
        _check_finite(self.model, f"the checkpoint of step {step}")
        ckpt.save_checkpoint(
            acc, self.run_dir, step, self.state.as_dict(), needed_bytes=self.checkpoint_bytes
        )
        self.last_saved_step = step
        if acc.is_main_process:
            ckpt.prune_checkpoints(self.run_dir, self.recipe.output.keep_checkpoints)
        acc.wait_for_everyone()

    def say(self, text: str, *, err: bool = False) -> None:
        """A line on the main process (stderr with `err`), written above the progress bar."""
        if not self.accelerator.is_main_process:
            return
        progress = getattr(self, "progress", None)
        if progress is not None and not progress.disable:
            progress.write(text, file=sys.stderr if err else None)
        else:
            print(text, flush=True, file=sys.stderr if err else sys.stdout)

    def log(self, values: dict[str, float], step: int) -> None:
        self.accelerator.log(values, step=step)

    # ------------------------------------------------------------------ save

    def save(self) -> TrainResult | None:
        """Write the adapter and the run's reports; only the main process touches the disk."""
        from finetune.recipe import save_recipe

        acc, r = self.accelerator, self.recipe
        _check_finite(self.model, "the final adapter")
        after_load = self.expert_load()
        state_dict = acc.get_state_dict(self.model)  # collective under FSDP: every process calls it
        metrics = RunMetrics.of_run(
            self.state,
            r,
            eval_is_lm=self.eval_is_lm,
            trainable_params=self.trainable_params,
            total_params=self.total_params,
            num_processes=acc.num_processes,
        )
        adapter_dir = self.run_dir / "adapter"
        if acc.is_main_process:
            adapter_bytes = ckpt.estimate_checkpoint_bytes(acc.unwrap_model(self.model), optimizer_states=0)
            ckpt.check_disk_space(self.run_dir, adapter_bytes, what="final adapter")
            images = write_plots(self.run_dir, self.state, after_load)
            with ckpt.atomic_folder(adapter_dir) as tmp:
                # save_embedding_layers=False: the vocabulary is never resized here, so a frozen
                # lm_head / embedding is the base's own and does not belong in the adapter.
                acc.unwrap_model(self.model).save_pretrained(
                    tmp, state_dict=state_dict, safe_serialization=True, save_embedding_layers=False
                )
                save_recipe(r, tmp / "recipe.yaml")
                if getattr(self.tokenizer, "label_names", None):  # classification: the label order
                    self.tokenizer.save_pretrained(tmp)
                ckpt.write_json(tmp / "metrics.json", metrics.as_dict())
                write_card(tmp, r, metrics, images)
                ckpt.failpoint("adapter-mid-write")
            ckpt.write_json_atomic(self.run_dir / "metrics.json", metrics.as_dict())
            write_history(self.run_dir, self.state)
            if r.output.push_to_hub:
                from adapters.hub import push_folder

                out = r.output
                acc.print(
                    push_folder(
                        adapter_dir, out.push_to_hub, private=out.private, revision=None, dry_run=False
                    )
                )
        acc.wait_for_everyone()
        return TrainResult(self.run_dir, metrics) if acc.is_main_process else None

    # ------------------------------------------------------------------ cleanup

    def cleanup(self) -> None:
        acc = self.accelerator
        if acc is None:
            return
        end_training(acc)  # trackers closed, process group released, settings forgotten
        self.accelerator = None


# ============================================================================= loop helpers


def _maybe(condition: bool, context, *args):
    import contextlib

    return context(*args) if condition else contextlib.nullcontext()


def _as_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if hasattr(value, "full_tensor"):  # a DTensor under FSDP2
            value = value.full_tensor()
        return float(value.item())
    return float(value)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _first_batches(dataset: Any, collate: Any, batch_size: int, limit: int | None) -> list[dict]:
    """The eval batches, fixed for the whole run (same before, during and after training)."""
    if dataset is None:
        return []
    from torch.utils.data import DataLoader

    batches = []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate):
        batches.append(batch)
        if limit is not None and len(batches) >= limit:
            break
    return batches


def _load_shares(stats: Any) -> list[list[float]] | None:
    """routing_stats(...) -> per layer, the share of routed tokens each expert received."""
    counts = stats.get("counts") if isinstance(stats, dict) else stats
    if counts is None:
        return None
    rows = []
    for row in counts:
        row = torch.as_tensor(row, dtype=torch.float64)
        rows.append((row / row.sum().clamp_min(1e-12)).tolist())
    return rows


def _check_finite(model: torch.nn.Module, what: str) -> None:
    for name, p in model.named_parameters():
        if p.requires_grad and not bool(torch.isfinite(p.detach()).all()):
            raise MoetuneError(f"not writing {what}: parameter {name} holds NaN/inf values")


def make_scheduler(t: Any, optimizer: torch.optim.Optimizer, total_steps: int):
    """Linear warmup, then cosine / linear decay to 0, or constant."""
    from transformers import get_scheduler

    if t.warmup_steps is not None:
        warmup = t.warmup_steps
    elif t.warmup_fraction is not None:
        warmup = round(t.warmup_fraction * total_steps)
    else:
        warmup = 0
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[t.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


# ============================================================================= entry point


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m finetune.train RECIPE`: what every process of an `accelerate launch` runs."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m finetune.train",
        description="Train from a recipe in this process (or in each process of `accelerate launch -m "
        "finetune.train`); `moetune train` has the full command line.",
    )
    parser.add_argument("recipe", help="recipe YAML (a path or a bundled recipe name)")
    parser.add_argument("--output", default=None, help="run folder (default: the recipe's output.dir)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run in the run folder")
    parser.add_argument("--no-summary", action="store_true", help="the launching process prints it")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    args = parser.parse_args(argv)
    try:
        result = launch_training(
            args.recipe, output_dir=args.output, resume=args.resume, overwrite=args.overwrite
        )
    except MoetuneError as err:
        if args.debug:
            raise
        print(f"moetune: error: {err}", file=sys.stderr)
        return err.exit_code
    if result is not None and not args.no_summary:
        print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
