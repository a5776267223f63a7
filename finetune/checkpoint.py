"""Checkpoints that survive a crash: atomic folders, a disk-space check first, and resume.

A checkpoint is a folder `checkpoints/step-000120/` in the run folder: Accelerate's `save_state`
(trainable weights, optimizer, scheduler, RNG states) plus `trainer_state.json` (our step counter,
epoch and metric history). It is written under a temporary name, every file is fsynced, and only
then renamed into place, so a crash or a `kill -9` at any moment leaves either the whole new
checkpoint or none of it; the previous checkpoints are never touched until the new one is complete.
The final adapter folder is written the same way (`atomic_folder`). The fsync helpers are
adapters/output_folder.py's; the rename here differs from that module's `atomic_output_folder` in
one way a run needs: a replaced folder is kept as `.old-NAME` until the new one is in place, and
`clean_stale` puts it back on resume when a crash fell between the two renames.

Before writing, the free space of the target file system is compared with an estimate of what the
checkpoint needs; when it does not fit, a `MoetuneError` says so and nothing is written.

Ctrl-C (SIGINT) or SIGTERM during training is caught by `InterruptGuard`: the step in flight
finishes, a checkpoint is written the same atomic way, and the run stops with `TrainingInterrupted`
("rerun with --resume"). A second Ctrl-C while that checkpoint is written stops at once (the atomic
write leaves the previous checkpoints intact).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from adapters.output_folder import fsync_folder, fsync_tree, write_file_atomic
from finetune.errors import MoetuneError

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Headroom on top of the estimate: RNG and scheduler files, tracker logs written meanwhile, rounding.
SLACK_BYTES = 8 << 20


# ----------------------------------------------------------------------------- fault injection


def failpoint(name: str, step: int | None = None) -> None:
    """Send this process a signal here when MOETUNE_FAILPOINT names this point (fault tests only).

    MOETUNE_FAILPOINT is `NAME`, `NAME@STEP`, optionally followed by `:SIGNAL` (default SIGKILL), e.g.
    `after-step@7` or `after-step@5:SIGINT`. The fault tests need a signal at an exact place (halfway
    through writing a checkpoint, after a given step), which no polling from outside can hit reliably;
    the signal is real, and the process meets it exactly as it would from `kill` or a Ctrl-C.
    """
    wanted = os.environ.get("MOETUNE_FAILPOINT")
    if not wanted:
        return
    point, _, signal_name = wanted.partition(":")
    if point in (name, f"{name}@{step}"):
        os.kill(os.getpid(), getattr(signal, signal_name or "SIGKILL"))


# ----------------------------------------------------------------------------- interrupts


RESUME_HINT = "rerun the same command with --resume to continue"  # the launcher looks for it too


class TrainingInterrupted(MoetuneError):
    """The run stopped on SIGINT / SIGTERM after saving a resumable checkpoint."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention: 130 for Ctrl-C, 143 for SIGTERM

    @classmethod
    def after_step(cls, step: int, total_steps: int, signum: int, run_dir: Path) -> TrainingInterrupted:
        """A run stopped by `signum` after `step`, its checkpoint saved in `run_dir`."""
        name = signal.Signals(signum).name
        return cls(
            f"training interrupted by {name} after step {step} of {total_steps}; checkpoint saved in "
            f"{latest_checkpoint(run_dir)}; {RESUME_HINT}",
            signum,
        )


class InterruptGuard:
    """While active, SIGINT / SIGTERM only set a flag that the training loop checks after each step.

    The first signal asks the loop to stop cleanly (checkpoint, then `TrainingInterrupted`). Ctrl-C
    then goes back to its default, so a second Ctrl-C stops the process at once; SIGTERM stays a
    request, because launchers (torchrun's agent on Ctrl-C, job schedulers) follow the first signal
    with SIGTERM and then, after a grace period, SIGKILL: the checkpoint gets that grace period.
    Signal handlers can only be installed from the main thread; elsewhere the guard does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> InterruptGuard:
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = self.received or signum
        if signal.SIGINT in self._previous:
            signal.signal(signal.SIGINT, self._previous.pop(signal.SIGINT))

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def requested(self, accelerator) -> int | None:
        """The signal received by any process (all of them must stop at the same step), else None."""
        mine = self.received or 0
        if accelerator.num_processes > 1:
            flag = torch.tensor(mine, device=accelerator.device)
            mine = int(accelerator.reduce(flag, "max").item())
        return mine or None


# ----------------------------------------------------------------------------- disk space


def free_bytes(folder: Path) -> int:
    """Free bytes on the file system holding `folder` (its closest existing parent)."""
    folder = Path(folder).resolve()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def estimate_checkpoint_bytes(
    model: torch.nn.Module, *, optimizer_states: int = 2, frozen_too: bool = False
) -> int:
    """Bytes a checkpoint of `model` will take: trainable weights + AdamW's two moments, in fp32.

    Frozen base weights are not saved (see `trainable_state_filter`) unless `frozen_too` (FSDP's
    sharded checkpoints hold the whole model), so normally only trainable ones count.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return trainable * 4 * (1 + optimizer_states) + (frozen if frozen_too else 0) + SLACK_BYTES


def check_disk_space(folder: Path, needed: int, *, what: str) -> None:
    """Refuse to start a write that cannot finish (a half-written folder helps nobody)."""
    free = free_bytes(folder)
    if free < needed:
        raise MoetuneError(
            f"not enough disk space to write the {what} in {folder}: about {_mb(needed)} needed, "
            f"{_mb(free)} free; free some space (older checkpoints are kept and still resumable)"
        )


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# ----------------------------------------------------------------------------- atomic folders


def tmp_path_for(final: Path) -> Path:
    return final.with_name(TMP_PREFIX + final.name)


def publish(tmp: Path, final: Path) -> None:
    """Make the complete folder `tmp` visible as `final` (replacing an older `final` safely)."""
    fsync_tree(tmp)
    old = final.with_name(OLD_PREFIX + final.name)
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)  # `final` is briefly absent; `old` still holds it (see clean_stale)
    os.replace(tmp, final)
    fsync_folder(final.parent)
    if old.exists():
        shutil.rmtree(old)


@contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """Write a folder under a temporary name; on success, fsync and rename it to `final`.

    On an exception the temporary folder is removed and `final` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, final)


def clean_stale(folder: Path) -> list[Path]:
    """Remove leftovers of writes a crash interrupted; restore a folder caught mid-replacement."""
    removed = []
    if not folder.is_dir():
        return removed
    for path in sorted(folder.iterdir()):
        if path.name.startswith(OLD_PREFIX):
            final = path.with_name(path.name[len(OLD_PREFIX) :])
            if not final.exists():  # killed between the two renames of `publish`: put it back
                os.replace(path, final)
                continue
        if path.name.startswith((TMP_PREFIX, OLD_PREFIX)):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are never listed)."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / STATE_FILE).exists()]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(checkpoint) / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise MoetuneError(
            f"checkpoint {checkpoint} is unreadable ({err}); delete it to resume from the one before"
        ) from err


def _json_text(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def write_json(path: Path, data: Any) -> None:
    """Write JSON and fsync it (used inside temporary folders; `publish` renames the folder)."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(_json_text(data))
        fh.flush()
        os.fsync(fh.fileno())


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace a single JSON file atomically (adapters/output_folder.py: temporary name, fsync, rename)."""
    write_file_atomic(path, _json_text(data))


def trainable_state_filter(model: torch.nn.Module):
    """A `register_save_state_pre_hook` hook that keeps only trainable weights in the checkpoint.

    A LoRA run trains well under 1% of the parameters; saving the frozen base at every checkpoint
    would cost its full size each time for nothing (it is reloaded from MODEL on resume).
    """
    keep = {name for name, p in model.named_parameters() if p.requires_grad}

    def hook(models, weights, output_dir) -> None:
        for i, state in enumerate(weights):
            weights[i] = {k: v for k, v in state.items() if _strip_wrappers(k) in keep or k in keep}

    return hook


def prepare_checkpoints(accelerator, model: torch.nn.Module) -> int:
    """Make the run's checkpoints keep only the trainable weights (`trainable_state_filter`); returns
    the bytes one checkpoint needs. `model` is the prepared model."""
    from accelerate.utils import DistributedType

    unwrapped = accelerator.unwrap_model(model)
    accelerator.register_save_state_pre_hook(trainable_state_filter(unwrapped))
    fsdp = accelerator.distributed_type == DistributedType.FSDP  # its sharded states hold the frozen base
    return estimate_checkpoint_bytes(unwrapped, frozen_too=fsdp)


def _strip_wrappers(name: str) -> str:
    return name.removeprefix("module.").replace("_orig_mod.", "")


def save_checkpoint(
    accelerator, run_dir: Path, step: int, state: dict[str, Any], *, needed_bytes: int
) -> Path:
    """Write checkpoint `step` atomically; every process must call this (sharded states are collective)."""
    final = checkpoint_dir(run_dir, step)
    tmp = tmp_path_for(final)
    if accelerator.is_main_process:
        check_disk_space(final.parent, needed_bytes, what=f"checkpoint of step {step}")
        final.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        failpoint("checkpoint-mid-write", step)
        write_json(tmp / STATE_FILE, state)  # last file in: its presence marks a complete folder
        publish(tmp, final)
    accelerator.wait_for_everyone()
    return final


# What `moetune train` writes into a run folder (and `--overwrite` removes; nothing else is touched).
RUN_OUTPUTS = (CHECKPOINTS, "adapter", "plots", "logs", "metrics.json", "history.json", "recipe.yaml")


def remove_run_outputs(run_dir: Path) -> list[str]:
    """Delete a previous run's outputs from `run_dir` (other files stay); returns the names removed."""
    removed = []
    for name in RUN_OUTPUTS:
        for path in (
            Path(run_dir) / name,
            Path(run_dir) / (TMP_PREFIX + name),
            Path(run_dir) / (OLD_PREFIX + name),
        ):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            else:
                continue
            if path.name == name:
                removed.append(name)
    return removed


def prune_checkpoints(run_dir: Path, keep: int | None) -> None:
    """Keep the newest `keep` checkpoints (None or 0 keeps all). Main process only."""
    if not keep:
        return
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def check_trainable_keys(checkpoint: Path, model: torch.nn.Module) -> None:
    """Every trainable weight must be in the checkpoint (it is loaded non-strictly: the base is not)."""
    from safetensors import safe_open

    path = Path(checkpoint) / "model.safetensors"
    if not path.exists():  # sharded (FSDP / DeepSpeed) checkpoints are checked by their own loaders
        return
    with safe_open(str(path), framework="pt") as fh:
        saved = {_strip_wrappers(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    missing = sorted(n for n, p in model.named_parameters() if p.requires_grad and n not in saved)
    if missing:
        raise MoetuneError(
            f"checkpoint {checkpoint} lacks {len(missing)} trainable weight(s) (e.g. {missing[0]}); it was "
            "written for another adapter: resume with the recipe that wrote it, or start a new run folder"
        )


def check_finite(model: torch.nn.Module, what: str) -> None:
    """Refuse to write `what` when a trainable weight holds NaN/inf (a checkpoint nobody can use)."""
    for name, p in model.named_parameters():
        if p.requires_grad and not bool(torch.isfinite(p.detach()).all()):
            raise MoetuneError(f"not writing {what}: parameter {name} holds NaN/inf values")


def load_checkpoint(accelerator, checkpoint: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Restore model/optimizer/scheduler/RNG from `checkpoint` (`model`: the prepared model); returns
    its trainer state."""
    from finetune.accelerator import is_sharded

    state = read_trainer_state(checkpoint)
    check_trainable_keys(checkpoint, accelerator.unwrap_model(model))
    # Checkpoints hold only the trainable weights, so the frozen base weights are "missing" by design.
    kwargs = {} if is_sharded(accelerator) else {"strict": False}
    accelerator.load_state(str(checkpoint), **kwargs)
    return state
