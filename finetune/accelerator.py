"""The run's Accelerator, and every use of Accelerate beyond its public API, each with its reason.

The training loop uses Accelerate's public API only (prepare, backward, no_sync, clip_grad_norm_,
reduce, save_state / load_state, the trackers). What that API cannot do is done here, one function
per need, and tests/finetune/test_accelerator.py fails when upstream renames or changes what they touch:

- `enable_fsdp_on_cpu` / `switch_to_fsdp`: Accelerate turns an FSDP launch config on for accelerator devices only; on
  CPU processes (gloo: the tests, a sharded run debugged on a laptop) it falls back to DDP. We switch
  FSDP on the way its own state does: `AcceleratorState.fsdp_plugin` and `.distributed_type`, and
  `PartialState._shared_state["distributed_type"]`, which its FSDP save / load helpers read.
- `reset_state`: Accelerate's state is a process-wide singleton that refuses other settings (mixed
  precision, trackers) once set; a second run in one process (tests, notebooks) starts it afresh
  with `AcceleratorState._reset_state` / `GradientState._reset_state`, which Accelerate's own tests use.

An engine's settings (DeepSpeed, FSDP options) become Accelerate plugins in `make_accelerator`;
engine-specific refusals go in `check_engine`. DeepSpeed (public APIs, each with its reason where it
is used): gloo named for CPU processes, the world-size guard (`check_world_size`), the recipe's
clipping and an empty ZeRO-3 leaf-module list in its config (`configure_deepspeed`), the model built
whole and partitioned by `prepare` (`whole_model_building`), the schedule in its checkpoints
(`prepare_scheduler`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from finetune.errors import MoetuneError

if TYPE_CHECKING:
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.optim.lr_scheduler import LRScheduler

    from finetune.recipe import Recipe, TrainSection

TRACKER_PROJECT = "moetune"


def make_accelerator(recipe: Recipe, run_dir: Path) -> Accelerator:
    """One Accelerator for the run: mixed precision and trackers from the recipe, logs in the run folder."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    trackers = resolve_trackers(recipe.output.report_to)
    cpu, handlers = not has_accelerator(), []
    if cpu and launched_with_deepspeed():
        # DeepSpeed runs only on Accelerate's accelerator path (`cpu=False`; DS_ACCELERATOR=cpu does
        # the rest), and on a machine without GPUs that path picks no process-group backend: every
        # process would think it is process 0 of 1. Name gloo, the backend CPU processes use.
        cpu, handlers = False, [InitProcessGroupKwargs(backend="gloo")]
    acc = Accelerator(
        cpu=cpu,
        mixed_precision=recipe.train.mixed_precision,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        step_scheduler_with_optimizer=False,  # we step it once per optimizer step, whatever the processes
        kwargs_handlers=handlers,
    )
    check_world_size(acc.num_processes)
    enable_fsdp_on_cpu(acc)
    configure_deepspeed(acc, recipe.train)
    return acc


def configure_deepspeed(acc: Accelerator, train: TrainSection) -> None:
    """What a DeepSpeed run needs from the recipe and for LoRA on fused experts (before `prepare`).

    - Clipping: the DeepSpeed engine clips inside its own step, so `train.max_grad_norm` goes into
      its config (`gradient_clipping: auto`, or absent); a different number there is refused.
    - Leaf modules: DeepSpeed makes some MoE blocks ZeRO-3 "leaf modules" by default (Mixtral's,
      Qwen2-MoE's and Qwen3-MoE's sparse blocks: their parameters gathered once for the whole block),
      which was reported to give LoRA on the block's fused experts size-0 (still partitioned) weights
      in backward (docs/scaling.md: not reproduced here). With no leaf classes each module gathers
      its own parameters, as for the built-in model, which is what the tests run. A config that sets
      `zero_optimization.leaf_module` keeps its own.
    """
    plugin = acc.state.deepspeed_plugin
    if plugin is None:
        return
    config = plugin.deepspeed_config
    clip = float(train.max_grad_norm or 0.0)  # 0: no clipping, for DeepSpeed as for the recipe
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = clip
    elif float(config["gradient_clipping"]) != clip:
        raise MoetuneError(
            f"the DeepSpeed config clips gradients at {config['gradient_clipping']} but the recipe's "
            f"train.max_grad_norm is {train.max_grad_norm}; set gradient_clipping: auto in the launch "
            "config (the recipe decides) or make the two equal"
        )
    zero = config.setdefault("zero_optimization", {})
    zero.setdefault("leaf_module", {"classes": []})


@contextlib.contextmanager
def whole_model_building(acc: Accelerator) -> Iterator[None]:
    """Build the model and its adapter whole under DeepSpeed ZeRO-3; `prepare` partitions them.

    Accelerate registers its DeepSpeed config with transformers whenever a DeepSpeed plugin is
    active, and transformers then builds every model inside `deepspeed.zero.Init` (parameters
    partitioned as they are created) even with `zero3_init_flag: false`. The adapter's targets are
    found from the weights' shapes, which partitioned parameters no longer have; so the config is
    unregistered while the model and adapter are built (each process holds the whole base for that
    moment, as under DDP) and registered again for `prepare`.
    """
    from transformers.integrations import unset_hf_deepspeed_config

    plugin = acc.state.deepspeed_plugin
    if plugin is None:
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def prepare_scheduler(acc: Accelerator, scheduler: LRScheduler) -> LRScheduler:
    """The learning-rate schedule, prepared, and saved in every checkpoint whatever the engine.

    It is prepared apart from the model (its length needs the prepared loader). Accelerate's DeepSpeed
    path then hands it back as it is and leaves it out of `save_state`, so a resumed run would start
    the schedule again from step 0; `register_for_checkpointing` puts it back into the checkpoints.
    """
    from accelerate.utils import DistributedType

    prepared = acc.prepare(scheduler)
    if acc.distributed_type == DistributedType.DEEPSPEED:
        acc.register_for_checkpointing(prepared)
    return prepared


def launched_with_deepspeed() -> bool:
    """True in a process that `accelerate launch` started with a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def check_world_size(num_processes: int) -> None:
    """Stop when Accelerate sees fewer processes than the launcher started (WORLD_SIZE).

    That happens when no process-group backend was chosen: each process then trains alone on all the
    data as process 0 of 1, and the run looks fine while the loss is counted once per process.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if num_processes != launched:
        raise MoetuneError(
            f"the launcher started {launched} processes (WORLD_SIZE={launched}) but Accelerate sees "
            f"{num_processes} (no process-group backend was set up); on a machine without GPUs launch "
            "with `moetune train --num-processes N` or set ACCELERATE_USE_CPU=true (DeepSpeed: "
            "DS_ACCELERATOR=cpu)"
        )


def check_engine(acc: Accelerator, train: TrainSection) -> None:
    """Refuse recipe settings the launched engine cannot honour (before any model is loaded)."""
    from accelerate.utils import DistributedType

    forced_cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    if launched_with_deepspeed() and forced_cpu and acc.distributed_type != DistributedType.DEEPSPEED:
        raise MoetuneError(
            "launched with a DeepSpeed config, but ACCELERATE_USE_CPU=true turned DeepSpeed off (the run would "
            "be plain data parallel); unset ACCELERATE_USE_CPU (DS_ACCELERATOR=cpu runs DeepSpeed on CPUs)"
        )
    plugin = acc.state.deepspeed_plugin
    if plugin is not None and plugin.zero3_init_flag:
        raise MoetuneError(
            "zero3_init_flag: true in the DeepSpeed launch config is not supported: LoRA targets are found from "
            "the weights' shapes, which zero.Init partitions while loading; set zero3_init_flag: false (each "
            "process loads the base, then DeepSpeed partitions it)"
        )
    if acc.distributed_type == DistributedType.DEEPSPEED and train.grad_accum > 1:
        raise MoetuneError(
            "train.grad_accum > 1 is not supported under DeepSpeed (its engine steps after every backward); "
            "raise train.batch_size instead, or use recipes/accelerate/fsdp.yaml"
        )


def is_sharded(acc: Accelerator) -> bool:
    """True when every process holds a shard of the whole model (its checkpoints hold the frozen base too)."""
    from accelerate.utils import DistributedType

    return acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def as_float(value: Any) -> float:
    """A reduced scalar (a clipped gradient norm) as a float, whole: under FSDP2 it is a DTensor."""
    if isinstance(value, torch.Tensor):
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        return float(value.item())
    return float(value)


def resolve_trackers(report_to: Sequence[str]) -> list[str]:
    """The trackers asked for; one that is not installed is an error, not a silent omission."""
    for name in report_to:
        if name != "tensorboard" and importlib.util.find_spec(name) is None:
            raise MoetuneError(
                f"output.report_to lists {name!r}, which is not installed; pip install {name} or remove it"
            )
    return list(dict.fromkeys(report_to))


def has_accelerator() -> bool:
    """A GPU (or another torch accelerator) is present; without one every process runs on the CPU."""
    accel = getattr(torch, "accelerator", None)
    if accel is not None and hasattr(accel, "is_available"):
        return bool(accel.is_available())
    return torch.cuda.is_available()


def enable_fsdp_on_cpu(acc: Accelerator) -> None:
    """Honour an FSDP launch config on CPU processes (gloo), where Accelerate would fall back to DDP.

    Accelerate turns FSDP on only for accelerator devices; on CPUs we switch it on the same way it
    does, so the FSDP code path is the one that runs (private fields: see the module docstring).
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not wants_fsdp or acc.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables `accelerate launch` exported
    if acc.mixed_precision != "no":
        plugin.set_mixed_precision(acc.mixed_precision)
    switch_to_fsdp(acc, plugin)


def switch_to_fsdp(acc: Accelerator, plugin: FullyShardedDataParallelPlugin) -> None:
    """Set what Accelerate's state sets when it enables FSDP itself (private fields: see the module
    docstring): the plugin and the distributed type, in the Accelerator's state and in the shared
    process state that Accelerate's FSDP save / load helpers read."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    acc.state.fsdp_plugin = plugin
    acc.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def end_training(acc: Accelerator) -> None:
    """Close the trackers, release the process group, and forget the settings of this run."""
    acc.end_training()
    reset_state()


def reset_state() -> None:
    """Start Accelerate's process-wide state afresh, so the next run in this process may use other
    settings (private fields: see the module docstring)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
