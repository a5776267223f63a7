"""Launching a run on several processes: `accelerate launch` of `python -m finetune.train`.

`moetune train R.yaml --num-processes N` resolves the recipe once (overrides applied, every key
checked), checks the run folder (`--resume` / `--overwrite`), writes the resolved recipe to
RUN/recipe.yaml, and starts N processes of

    accelerate launch --num_processes N ... -m finetune.train RUN/recipe.yaml --output RUN

each of which trains its share; the main one writes the run's files and the launching process
reads the result back from RUN/metrics.json. `accelerate launch --config_file
recipes/accelerate/ddp.yaml -m finetune.train R.yaml` (or `... cli.py train R.yaml`) is the same
run started by hand. Multi-node settings (`--num_machines`, `--machine_rank`, `--main_process_ip`)
are more arguments of `launch_command`.
"""

from __future__ import annotations

import codecs
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from finetune import checkpoint as ckpt
from finetune.accelerator import has_accelerator
from finetune.errors import MoetuneError

if TYPE_CHECKING:
    from finetune.recipe import Recipe
    from finetune.reporting import TrainResult

TRAIN_MODULE = "finetune.train"  # the training recipe's own entry point: `python -m finetune.train`
PROJECT_ROOT = Path(__file__).resolve().parents[1]  # where `finetune` is imported from


def inside_distributed_launch() -> bool:
    """True inside `accelerate launch` / torchrun (each process then trains; none re-launches)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ


def launch_run(
    recipe: Recipe,
    run_dir: Path,
    *,
    num_processes: int,
    resume: bool = False,
    overwrite: bool = False,
    debug: bool = False,
) -> TrainResult:
    """Train the resolved `recipe` into `run_dir` on `num_processes` local processes; its result.

    The run folder is checked here, so a refused start launches nothing; the recipe's notes are
    said here, once (the launched processes read the resolved file, which leaves nothing implicit).
    The launched processes' messages pass through; this one prints the summary, so they do not.
    """
    import signal

    from finetune.recipe import save_recipe
    from finetune.reporting import TrainResult
    from finetune.resume import check_run_folder

    check_run_folder(run_dir, recipe, resume=resume, overwrite=overwrite)
    for line in recipe.warnings:  # overrides that replaced a key of the recipe file
        print(line, file=sys.stderr, flush=True)
    for line in recipe.notes:  # defaults relied on, sample data found in the installation
        print(line, flush=True)
    recipe_file = save_recipe(recipe, run_dir / "recipe.yaml")
    args = [str(recipe_file), "--output", str(run_dir), "--no-summary"]
    args += ["--resume"] * resume + ["--overwrite"] * overwrite + ["--debug"] * debug
    env = launch_env(num_processes)
    rc, err = launch_on_a_free_port(lambda port: launch_command(num_processes, port, args), env=env)
    if rc != 0 and ckpt.RESUME_HINT in err:  # they stopped on Ctrl-C and saved a checkpoint
        raise ckpt.TrainingInterrupted(
            f"training on {num_processes} processes was interrupted (see above); {ckpt.RESUME_HINT}",
            signal.SIGINT,
        )
    if rc != 0:
        raise MoetuneError(
            f"training on {num_processes} processes failed (exit code {rc}); see the messages above"
        )
    return TrainResult.read(run_dir)


def launch_command(num_processes: int, port: int, args: Sequence[str]) -> list[str]:
    """`accelerate launch` of `python -m finetune.train ARGS` on `num_processes` local processes."""
    # One launcher option and its value a line (fmt: skip), then the module and its arguments.
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", str(num_processes),
        "--num_machines", "1",
        "--mixed_precision", "no",
        "--dynamo_backend", "no",
        "--main_process_port", str(port),
        "--multi_gpu",
        "-m", TRAIN_MODULE,
    ]  # fmt: skip
    return cmd + list(args)


def launch_env(num_processes: int) -> dict[str, str]:
    """The launched processes' environment: this one's, the same `finetune` on their path, and CPU
    processes (one thread share each) when there is no GPU."""
    env = dict(os.environ)
    # The processes import the same `finetune` as this one, from whatever folder they start in.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    if not has_accelerator():
        env["ACCELERATE_USE_CPU"] = "true"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    return env


def launch_on_a_free_port(
    command: Callable[[int], list[str]],
    *,
    env: dict[str, str],
    cwd: str | os.PathLike | None = None,
    echo: bool = True,
    attempts: int = 3,
    timeout: float | None = None,
) -> tuple[int, str]:
    """Run `command(port)` (a launcher whose rendezvous listens on `port`); returns (exit code, stderr).

    A free port has to be chosen before the launcher binds it, and another process may take it in
    between (the launcher then fails at once with EADDRINUSE, before any training): that case is
    retried on a new port. stderr is passed through as it comes (`echo`) and kept for the caller;
    a launcher still running after `timeout` seconds is killed.
    """
    for attempt in range(1, attempts + 1):
        proc = subprocess.Popen(command(_free_port()), env=env, cwd=cwd, stderr=subprocess.PIPE)
        watchdog = threading.Timer(timeout, proc.kill) if timeout else None
        if watchdog is not None:
            watchdog.start()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a chunk may split a character
        parts, interrupted = [], False
        while True:
            try:
                chunk = os.read(proc.stderr.fileno(), 65536)
            except KeyboardInterrupt:
                # Ctrl-C reached the launched processes as well: they save a checkpoint and stop, so
                # wait for them; a second Ctrl-C stops them at once.
                if interrupted:
                    proc.kill()
                    raise
                interrupted = True
                continue
            if not chunk:
                break
            parts.append(decoder.decode(chunk))
            if echo:
                sys.stderr.write(parts[-1])
                sys.stderr.flush()
        rc = proc.wait()
        proc.stderr.close()
        if watchdog is not None:
            watchdog.cancel()
        err = "".join(parts) + decoder.decode(b"", final=True)
        taken = "EADDRINUSE" in err or "address already in use" in err.lower()
        if rc == 0 or not taken or attempt == attempts:
            break
    return rc, err


def _free_port() -> int:
    """A port nothing listens on now (it may be taken again before use: see launch_on_a_free_port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
