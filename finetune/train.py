"""The training recipe behind `moetune train RECIPE.yaml`: one Accelerate loop, read top to bottom.

    setup       the Accelerator; per component: the model (base + LoRA), the data (a resumable
                sampler, fixed eval batches), the optimizer (AdamW on the trainable parameters and
                its schedule); the run folder and trackers; `--resume` restores the last checkpoint
    train       each optimizer step takes `grad_accum` micro-batches per process; logging, eval and
                checkpoints every N steps, and one at the end; Ctrl-C / SIGTERM saves one and stops
    eval        loss and perplexity on the eval batches, the recipe's `eval.metrics` and the retain
                loss, before, during and after training (finetune/evaluation/runs.py)
    checkpoint  trainable weights, optimizer, scheduler, RNG and the run state, written atomically
    save        adapter/ (PEFT + model card + recipe + metrics), metrics.json, history, plots; push
    cleanup     close the trackers, release the process group

What each step minimises and how it is normalised: finetune/losses.py; the optimizer and its
schedule: finetune/optimizer.py. What makes a resumed run replay the uninterrupted one exactly:
finetune/resume.py; how checkpoints are written: finetune/checkpoint.py. What the run shows, logs and
writes at the end: finetune/reporting.py. The Accelerator and every Accelerate detail:
finetune/accelerator.py. Several processes: finetune/launch.py starts `python -m finetune.train`
(this file's `main`; `launch.entry_parser` has its options) in each of them through
`accelerate launch`; only the main process writes the run's files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from finetune import checkpoint as ckpt
from finetune import launch, reporting
from finetune.accelerator import (
    TRACKER_PROJECT,
    as_float,
    check_engine,
    end_training,
    make_accelerator,
    prepare_scheduler,
    whole_model_building,
)
from finetune.errors import MoetuneError
from finetune.evaluate import expert_load_shares
from finetune.launch import ONE_MACHINE, Machines
from finetune.losses import StepLoss, forward_loss, preference_forward
from finetune.optimizer import make_optimizer, make_scheduler
from finetune.preference import make_objective
from finetune.recipe import Recipe, esft_profile, load_recipe, save_recipe
from finetune.reporting import Console, ExpertLoad, LogWindow, RunMetrics, StepResult, TrainResult
from finetune.resume import EpochSampler, RunState, check_run_folder, fingerprint, step_seed

if TYPE_CHECKING:
    from datasets import Dataset


def launch_training(
    recipe: str | os.PathLike | Recipe,
    *,
    overrides: Sequence[str] = (),
    output_dir: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    num_processes: int = 1,
    distributed: str = "ddp",
    machines: Machines = ONE_MACHINE,
    debug: bool = False,
) -> TrainResult | None:
    """Train the LoRA adapter a recipe describes; returns the run's result (`str()` is its summary).

    `recipe` is a YAML path, a bundled recipe name or a `Recipe`; `overrides` are `section.key=value`.
    A run folder that already holds checkpoints or an adapter needs `resume` (continue it) or
    `overwrite` (replace it). Inside a launch of several processes, the ones other than the main
    process return None. `distributed` names the engine of a launch of several processes (ddp, fsdp,
    zero3: the bundled configs in recipes/accelerate/); `machines` spreads them over several machines.
    """
    launch.check_launch(num_processes, distributed, machines, resume=resume, overwrite=overwrite)
    if isinstance(recipe, Recipe):
        if overrides:
            raise MoetuneError("pass overrides with a recipe file, not with a Recipe object")
    else:
        recipe = load_recipe(str(recipe), overrides)  # validated before any process starts
    run_dir = Path(output_dir or recipe.output.dir).expanduser()
    if num_processes > 1 and not launch.inside_distributed_launch():
        return launch.launch_run(
            recipe,
            run_dir,
            num_processes=num_processes,
            distributed=distributed,
            machines=machines,
            resume=resume,
            overwrite=overwrite,
            debug=debug,
        )
    run = TrainingRun(recipe, run_dir, resume=resume, overwrite=overwrite)
    try:
        run.setup()
        run.train()
        return run.save()
    finally:
        run.cleanup()


class TrainingRun:
    """One training run: setup, train (with eval and checkpoints), save, cleanup."""

    def __init__(self, recipe: Recipe, run_dir: Path, *, resume: bool = False, overwrite: bool = False):
        self.recipe, self.run_dir = recipe, Path(run_dir)
        self.resume, self.overwrite = resume, overwrite
        self.accelerator = None
        self.last_saved_step: int | None = None  # the step of the newest checkpoint on disk
        self.esft = None  # the experts selected in this run (adapter.experts: {threshold: ..})
        self.state = RunState(fingerprint=fingerprint(recipe))

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        from accelerate.utils import set_seed

        r = self.recipe
        self.accelerator = acc = make_accelerator(r, self.run_dir)
        self.console = Console(acc)
        check_engine(acc, r.train)
        checkpoint = check_run_folder(self.run_dir, r, resume=self.resume, overwrite=self.overwrite)
        if self.resume and checkpoint is None:
            acc.print(f"--resume: no checkpoint in {self.run_dir}; starting at step 0")
        for line in r.warnings:  # overrides that replaced a key of the recipe file
            self.console.say(line, err=True)
        for line in r.notes:  # defaults relied on, sample data found in the installation
            self.console.say(line)
        set_seed(r.train.seed)  # the same on every process, so randomly initialised parts agree
        with whole_model_building(acc):  # ZeRO-3: built whole here, partitioned by prepare
            base = self.setup_model()
            train_ds, collate = self.setup_data()
            self.setup_adapter(base, train_ds)
        self.setup_optimizer(train_ds, collate)
        self.setup_run_folder()
        acc.init_trackers(TRACKER_PROJECT, config=reporting.tracker_config(r))
        if checkpoint is not None:
            self.restore(checkpoint)
        acc.wait_for_everyone()

    def setup_model(self) -> torch.nn.Module:
        """The base model and its tokenizer (or processor), as `model.*` asks."""
        from finetune.loading import enable_gradient_checkpointing, load_model

        m = self.recipe.model
        model, self.tokenizer = load_model(
            m.name,
            dtype=m.dtype,
            trust_remote_code=m.trust_remote_code,
            allow_pickle=m.allow_pickle,
            modalities=m.modalities or None,
            quantize=m.quantize,
        )
        if m.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.base_config = model.config
        self.routes = getattr(model.config, "output_router_logits", None) is not None  # returns aux loss
        self.aux_coef = float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0)
        # train.method dpo / orpo / simpo: per-pair losses (finetune/losses.py); None for sft
        self.objective = make_objective(self.recipe.train.method, self.recipe.train.preference)
        return model

    def setup_data(self) -> tuple[Dataset, Callable[[list[dict]], dict]]:
        """The training set and its collator; the eval batches, fixed for the whole run."""
        from finetune.data import build_datasets, build_retain, make_collator
        from finetune.evaluation.runs import RunEvaluation

        d, t = self.recipe.data, self.recipe.train
        train_ds, eval_ds = build_datasets(d, self.tokenizer, seed=t.seed)
        collate = make_collator(d, self.tokenizer)
        retain_ds = build_retain(d, self.tokenizer, seed=t.seed)
        self.evaluation = RunEvaluation(self.recipe, self.tokenizer, eval_ds, collate, retain_ds)
        if self.objective is not None:
            if "chosen_ids" not in train_ds.column_names:
                raise MoetuneError(
                    f"train.method {t.method} needs data.format: preference (prompt / chosen / rejected "
                    f"records); data.train was read as {d.format or 'another format'}"
                )
            self.evaluation.use_pairs(self.objective)  # held-out pairs: reward metrics, chosen-answer loss
        return train_ds, collate

    def setup_adapter(self, model: torch.nn.Module, train_ds: Dataset) -> None:
        """LoRA on the base, as `adapter.*` asks; the target report says what it adapts."""
        from adapters import apply_lora
        from adapters.targets import count_trainable, target_report
        from finetune.evaluate import expert_call_sites

        label_names = getattr(train_ds, "label_names", None) or getattr(self.tokenizer, "label_names", None)
        if label_names and hasattr(model, "set_label_names"):
            # Multi-label head sized and ordered by the data, before LoRA so the adapter can train it.
            model.set_label_names(list(label_names))
        adapter = dataclasses.asdict(self.recipe.adapter)
        if esft_profile(self.recipe.adapter.experts) is not None:  # ESFT: profile the base, select, then LoRA
            from finetune.evaluation.esft import select_for_run

            self.esft = select_for_run(model, self.recipe, self.tokenizer, train_ds)
            adapter["experts"] = self.esft.selection
        self.model = apply_lora(model, **adapter)
        self.trainable_params = count_trainable(self.model)  # as the report counts (ESFT: chosen experts)
        self.total_params = sum(p.numel() for p in self.model.parameters())
        self.has_experts = bool(expert_call_sites(self.model))
        self.accelerator.print(target_report(self.model))

    def setup_optimizer(self, train_ds: Dataset, collate: Callable[[list[dict]], dict]) -> None:
        """AdamW on the trainable parameters, the loader (order from (seed, epoch)), the schedule."""
        from torch.utils.data import DataLoader

        from adapters.expert_fast_path import set_experts_backend

        acc, t = self.accelerator, self.recipe.train
        sampler = EpochSampler(train_ds, self.recipe.data, batch_size=t.batch_size, seed=t.seed)
        train_dl = DataLoader(train_ds, batch_size=t.batch_size, sampler=sampler, collate_fn=collate)
        optimizer = make_optimizer(self.model, t)
        # The sampler is sharded over the processes by prepare.
        self.model, self.optimizer, self.train_dl = acc.prepare(self.model, optimizer, train_dl)
        set_experts_backend(self.model, self.recipe.model.experts_backend)  # on its device: "grouped" checks
        self.steps_per_epoch = math.ceil(len(self.train_dl) / t.grad_accum)
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        self.scheduler = prepare_scheduler(acc, make_scheduler(t, optimizer, self.total_steps))
        if self.objective is not None:  # DPO's reference: this model, its adapter disabled
            self.objective.reference_model = acc.unwrap_model(self.model)
        # Checkpoints keep only the trainable weights: the base comes back from MODEL on resume.
        self.checkpoint_bytes = ckpt.prepare_checkpoints(acc, self.model)

    def setup_run_folder(self) -> None:
        """Only now, with model and data loaded: a failed start keeps an old run that --overwrite replaces."""
        if not self.accelerator.is_main_process:
            return
        if self.overwrite:
            removed = ckpt.remove_run_outputs(self.run_dir)
            if removed:
                self.console.say(
                    f"--overwrite: removed the previous run's {', '.join(removed)} in {self.run_dir}"
                )
        ckpt.clean_stale(self.run_dir / ckpt.CHECKPOINTS)
        save_recipe(self.recipe, self.run_dir / "recipe.yaml")
        if self.esft is not None:
            self.esft.write(self.run_dir)
            self.console.say(str(self.esft))

    # ------------------------------------------------------------------ train

    def train(self) -> None:
        if self.state.step == 0 and self.evaluation.active:
            before = self.evaluation.measure(self.accelerator, self.model)  # logged names
            reporting.record_baseline(
                self.state, before, preference=self.objective is not None, expert_load=self.expert_load()
            )
            self.accelerator.log(before, step=0)
        self.console.start(self.total_steps, self.state.step)
        self.model.train()
        with ckpt.InterruptGuard() as interrupts:
            self.loop(LogWindow(), ExpertLoad(), interrupts)
        self.console.close()
        if self.state.step != self.last_saved_step:  # the end is always resumable
            self.save_checkpoint(self.state.step)
        if self.evaluation.active:
            self.run_eval(self.state.step)

    def loop(self, window: LogWindow, load: ExpertLoad, interrupts: ckpt.InterruptGuard) -> None:
        """Optimizer steps from the current one to the last; stops with a checkpoint on Ctrl-C."""
        from accelerate import skip_first_batches

        acc, t = self.accelerator, self.recipe.train
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
                self.state.tokens += result.tokens
                self.state.train_seconds += seconds
                window.add(result, seconds)
                last = step == self.total_steps
                logged = None
                if step % t.log_every == 0 or last:
                    logged = window.flush() | load.flush(acc) | {"train/lr": self.scheduler.get_last_lr()[0]}
                    acc.log(logged, step=step)
                self.console.step(logged)
                if t.eval_every and step % t.eval_every == 0 and not last and self.evaluation.active:
                    self.run_eval(step)
                if t.save_every and step % t.save_every == 0 and not last:
                    self.save_checkpoint(step)
                ckpt.failpoint("after-step", step)
                if last:
                    return
                signum = interrupts.requested(acc)
                if signum is not None:
                    self.stop_on_interrupt(step, signum)

    def train_step(self, micro_batches: list[dict], step: int, load: ExpertLoad) -> StepResult:
        """One optimizer step over `micro_batches`; the loss is normalised by the global count of label
        tokens (SFT) or of pairs (a preference objective)."""
        acc, t = self.accelerator, self.recipe.train
        pairs = self.objective is not None  # the unit of a preference loss is the pair
        step_loss = StepLoss.of_step(acc, micro_batches, pairs=pairs, aux_coef=self.aux_coef)
        seen = 0
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            # Gradients are all-reduced once, at the end.
            with contextlib.nullcontext() if last else acc.no_sync(self.model):
                if pairs:
                    out = preference_forward(self.model, batch, self.objective, routes=self.routes)
                else:
                    out = forward_loss(self.model, batch, routes=self.routes)
                acc.backward(step_loss.term(out))
            seen += reporting.input_token_count(batch)
            load.add(out.router_logits, batch, top_k=getattr(self.base_config, "num_experts_per_tok", None))

        max_norm = t.max_grad_norm if t.max_grad_norm else float("inf")
        norm = acc.clip_grad_norm_(self.model.parameters(), max_norm)  # None: DeepSpeed before its first step
        grad_norm = as_float(norm) if norm is not None else float("nan")
        train_loss, aux = step_loss.totals(acc)
        tokens = int(acc.reduce(torch.tensor(seen, device=acc.device), "sum").item())
        # fp16 overflows are the GradScaler's business (it skips the step); NaN loss never is.
        bad_grads = acc.scaler is None and norm is not None and not math.isfinite(grad_norm)
        if not math.isfinite(train_loss) or bad_grads:
            what = f"loss {train_loss}" if not math.isfinite(train_loss) else f"gradient norm {grad_norm}"
            self.skip_or_stop(step, what)
            return StepResult(loss=float("nan"), aux_loss=aux, grad_norm=grad_norm, tokens=tokens)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.train_loss.append([step, train_loss])
        metrics = step_loss.metrics(acc)  # rewards/* of a preference step
        return StepResult(loss=train_loss, aux_loss=aux, grad_norm=grad_norm, tokens=tokens, metrics=metrics)

    def skip_or_stop(self, step: int, what: str) -> None:
        """A non-finite loss or gradient: stop naming the step (nothing saved), or skip the update."""
        if self.recipe.train.nan_policy == "stop":
            last = ckpt.latest_checkpoint(self.run_dir)
            raise MoetuneError(
                f"training stopped at step {step}: {what} is not finite; nothing of this step was saved "
                f"(last good checkpoint: {last or 'none'}); lower train.lr, check the data, or set "
                "train.nan_policy: skip"
            )
        self.console.say(f"step {step}: {what} is not finite; skipping this step (train.nan_policy: skip)")
        self.state.skipped_steps.append(step)
        if self.accelerator.scaler is not None:  # fp16: the GradScaler sees the non-finite gradients and
            self.optimizer.step()  # skips the update itself, keeping its own state consistent
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def stop_on_interrupt(self, step: int, signum: int) -> None:
        """Save a resumable checkpoint of the finished `step` (unless there is one) and stop."""
        self.console.close()
        if step != self.last_saved_step:
            self.save_checkpoint(step)
        if not self.accelerator.is_main_process:  # the main process says it, once
            raise SystemExit(128 + signum)
        raise ckpt.TrainingInterrupted.after_step(step, self.total_steps, signum, self.run_dir)

    # ------------------------------------------------------------------ eval

    def expert_load(self) -> list[list[float]] | None:
        """Share of routed tokens per expert per MoE layer on the eval batches (None for dense models)."""
        batches = self.evaluation.loss_batches
        if not self.has_experts or not batches:
            return None
        return expert_load_shares(self.model, batches, self.accelerator.device)

    def run_eval(self, step: int) -> None:
        result = self.evaluation.measure(self.accelerator, self.model)
        reporting.record_eval(self.state, step, result, preference=self.objective is not None)
        self.accelerator.log(result, step=step)
        self.console.say(f"step {step}: {reporting.eval_line(result)}")

    # ------------------------------------------------------------------ checkpoint

    def save_checkpoint(self, step: int) -> None:
        acc = self.accelerator
        ckpt.check_finite(self.model, f"the checkpoint of step {step}")
        ckpt.save_checkpoint(
            acc, self.run_dir, step, self.state.as_dict(), needed_bytes=self.checkpoint_bytes
        )
        self.last_saved_step = step
        if acc.is_main_process:
            ckpt.prune_checkpoints(self.run_dir, self.recipe.output.keep_checkpoints)
        acc.wait_for_everyone()

    def restore(self, checkpoint: Path) -> None:
        state = RunState.from_dict(ckpt.load_checkpoint(self.accelerator, checkpoint, self.model))
        state.resumed_at.append(state.step)
        self.state, self.last_saved_step = state, state.step
        left = max(self.total_steps - state.step, 0)
        self.accelerator.print(
            f"resumed from {checkpoint} (step {state.step} of {self.total_steps}; {left} step(s) to run)"
        )

    # ------------------------------------------------------------------ save

    def save(self) -> TrainResult | None:
        """Write the adapter and the run's reports; only the main process touches the disk."""
        acc, r = self.accelerator, self.recipe
        ckpt.check_finite(self.model, "the final adapter")
        after_load = self.expert_load()
        state_dict = acc.get_state_dict(self.model)  # collective under FSDP: every process calls it
        metrics = RunMetrics.of_run(
            self.state,
            r,
            eval_is_lm=self.evaluation.lm,
            trainable_params=self.trainable_params,
            total_params=self.total_params,
            num_processes=acc.num_processes,
        )
        if acc.is_main_process:
            model = acc.unwrap_model(self.model)
            adapter_dir = reporting.write_outputs(
                self.run_dir, model, state_dict, r, self.tokenizer, self.state, metrics, after_load
            )
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
        if self.accelerator is not None:
            end_training(self.accelerator)  # trackers closed, process group released, settings forgotten
            self.accelerator = None


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m finetune.train RECIPE`: the recipe's own entry point, run by every launched process."""
    args = launch.entry_parser().parse_args(argv)
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
