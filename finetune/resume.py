"""Exact resume: what a checkpoint holds besides the weights, and what a resumed run may not change.

A run resumed from step k replays steps k+1..N exactly as the uninterrupted run did (the fault tests
compare the final adapters tensor by tensor), because:
- `RunState` (the loop's counters and histories) is saved as trainer_state.json in every checkpoint,
  next to Accelerate's weights, optimizer, scheduler and RNG states;
- data order is a pure function of (train.seed, epoch) (`EpochSampler`), so the loop skips the
  micro-batches an epoch already used instead of remembering an order;
- dropout is reseeded from (train.seed, step, process) before every step (`step_seed`);
- the recipe keys that decide all of this (`fingerprint`) must be those of the checkpoint.

A run folder is never silently reused: `check_run_folder` wants `--resume` to continue it and
`--overwrite` to replace it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from finetune import checkpoint as ckpt
from finetune.errors import MoetuneError

if TYPE_CHECKING:
    from finetune.recipe import DataSection, Recipe


@dataclass
class RunState:
    """The loop's counters and histories: trainer_state.json in every checkpoint."""

    step: int = 0  # optimizer steps done
    resumed_at: list[int] = field(
        default_factory=list
    )  # the steps this run was resumed from, one per --resume
    tokens: int = 0  # input tokens processed (all processes)
    train_seconds: float = 0.0
    skipped_steps: list[int] = field(default_factory=list)  # steps skipped as non-finite (nan_policy: skip)
    train_loss: list[list[float]] = field(default_factory=list)  # [step, loss] every step
    eval_loss: list[list[float]] = field(default_factory=list)  # [step, loss] every eval
    eval_loss_before: float | None = None  # eval loss before the first step
    # eval.metrics and the retain loss by logged name (eval/exact_match, retain/loss): [step, value] every eval
    eval_metrics: dict[str, list[list[float]]] = field(default_factory=dict)
    eval_metrics_before: dict[str, float] = field(default_factory=dict)  # their values before the first step
    expert_load_before: list[list[float]] | None = None  # (MoE layers, experts) shares before the first step
    # preference runs: [step, held-out reward accuracy, reward margin, preference loss] before and per eval
    eval_rewards_before: list[float] | None = None
    eval_rewards: list[list[float]] = field(default_factory=list)
    fingerprint: dict[str, str] = field(default_factory=dict)  # see `fingerprint`

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> RunState:
        """The state of a trainer_state.json (keys a later version added keep their defaults)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})


def fingerprint(recipe: Recipe) -> dict[str, str]:
    """The recipe keys a resumed run must share with its checkpoint (others, like max_steps, may change)."""
    t = recipe.train
    keys = {
        "model.name": recipe.model.name,
        "adapter": dataclasses.asdict(recipe.adapter),
        "data": dataclasses.asdict(recipe.data),
        "train.seed": t.seed,
        "train.batch_size": t.batch_size,
        "train.grad_accum": t.grad_accum,
    }
    if t.method != "sft":  # only then: checkpoints of SFT runs keep their fingerprint
        keys |= {"train.method": t.method, "train.preference": t.preference}
    return {k: repr(v) for k, v in keys.items()}


def check_run_folder(run_dir: Path, recipe: Recipe, *, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint `--resume` continues from, or None to start at step 0; refuses to reuse a run
    folder without `--resume` / `--overwrite`, and to resume with a recipe that changed a
    fingerprinted key. Reads only: nothing is loaded or written."""
    existing = ckpt.latest_checkpoint(run_dir)
    finished = (run_dir / "adapter" / "adapter_config.json").exists()
    if overwrite:
        return None
    if not resume:
        if finished:
            raise MoetuneError(
                f"run folder {run_dir} holds a finished run (its adapter/ is written); pass "
                "--overwrite to replace it, --resume to continue it (e.g. with a larger train.max_steps), "
                "or choose another --output"
            )
        if existing is not None:
            raise MoetuneError(
                f"run folder {run_dir} already has checkpoints (latest: {existing.name}); "
                "pass --resume to continue it, --overwrite to replace it, or choose another --output"
            )
        return None
    if existing is None:
        return None
    saved, now = ckpt.read_trainer_state(existing).get("fingerprint", {}), fingerprint(recipe)
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        raise MoetuneError(
            f"cannot resume {existing}: the recipe changed ({', '.join(changed)}); "
            "restore those keys or start a new run folder"
        )
    return existing


def step_seed(seed: int, step: int, process: int) -> int:
    """The RNG seed of one step on one process: independent of everything that happened before."""
    return int(np.random.SeedSequence([seed, step, process]).generate_state(1)[0])


class EpochSampler(torch.utils.data.Sampler):
    """A shuffled order that is a pure function of (seed, epoch): what makes data order resumable.

    With `data.group_by_length` the order comes from the data module's length-bucketing sampler,
    rebuilt for every epoch with seed + epoch.
    """

    def __init__(self, dataset: Any, data: DataSection, *, batch_size: int, seed: int) -> None:
        self.dataset, self.data, self.batch_size, self.seed = dataset, data, batch_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[int]:
        seed = self.seed + self.epoch
        if getattr(self.data, "group_by_length", False):
            from finetune.data import make_sampler

            yield from make_sampler(self.data, self.dataset, batch_size=self.batch_size, seed=seed)
            return
        generator = torch.Generator().manual_seed(seed)
        yield from torch.randperm(len(self.dataset), generator=generator).tolist()
