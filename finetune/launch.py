"""Launching a run on several processes: `accelerate launch` of `python -m finetune.train`.

`moetune train R.yaml --num-processes N --distributed ddp|fsdp|zero3` checks the launch options
(`check_launch`), resolves the recipe once (overrides applied, every key checked), checks the run
folder (`--resume` / `--overwrite`), writes the resolved recipe to RUN/recipe.yaml, and starts N
processes of

    accelerate launch --config_file recipes/accelerate/ENGINE.yaml --num_processes N ...
        -m finetune.train RUN/recipe.yaml --output RUN

each of which trains its share (`entry_parser` reads those options); the main one writes the run's
files and the launching process reads the result back from RUN/metrics.json. The same
`accelerate launch` typed by hand (with `cli.py train R.yaml` or `-m finetune.train R.yaml`) is the
same run. On several machines each one runs the same command with its own `--machine-rank`
(`Machines`); N counts the processes of all of them, as in `accelerate launch`, and the run folder
must be on a file system they share.
"""

from __future__ import annotations

import argparse
import codecs
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from finetune import checkpoint as ckpt
from finetune.accelerator import has_accelerator
from finetune.errors import MoetuneError
from finetune.recipe.files import RECIPES_DIR

if TYPE_CHECKING:
    from finetune.recipe import Recipe
    from finetune.reporting import TrainResult

TRAIN_MODULE = "finetune.train"  # the training recipe's own entry point: `python -m finetune.train`
PROJECT_ROOT = Path(__file__).resolve().parents[1]  # where `finetune` is imported from
# `--distributed NAME`: the bundled launch config of each engine (recipes/accelerate/).
ENGINES = {"ddp": "ddp.yaml", "fsdp": "fsdp.yaml", "zero3": "deepspeed-zero3.yaml"}


@dataclass(frozen=True)
class Machines:
    """Where the launched processes run: this machine alone (the default), or one of several.

    Every machine runs the same command with its own `machine_rank`; they meet at
    `main_process_ip:main_process_port` (machine 0's address), which all of them must be given.
    """

    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int | None = None

    def check(self, num_processes: int) -> None:
        """Refuse settings `accelerate launch` would misread or wait on forever."""
        if self.num_machines < 1:
            raise MoetuneError(f"--num-machines must be >= 1, got {self.num_machines}")
        if not 0 <= self.machine_rank < self.num_machines:
            raise MoetuneError(
                f"--machine-rank {self.machine_rank} is not one of 0..{self.num_machines - 1} "
                f"(--num-machines {self.num_machines})"
            )
        if num_processes % self.num_machines:
            raise MoetuneError(
                f"--num-processes {num_processes} is not a multiple of --num-machines {self.num_machines}; "
                "it counts the processes of all machines together"
            )
        if self.num_machines > 1 and (self.main_process_ip is None or self.main_process_port is None):
            raise MoetuneError(
                f"--num-machines {self.num_machines} needs --main-process-ip and --main-process-port "
                "(machine 0's address and a free port on it, the same on every machine)"
            )


ONE_MACHINE = Machines()


def engine_config(distributed: str) -> Path:
    """The bundled Accelerate / DeepSpeed launch config of `--distributed NAME`."""
    if distributed not in ENGINES:
        raise MoetuneError(f"--distributed {distributed!r} is not one of {', '.join(ENGINES)}")
    return RECIPES_DIR / "accelerate" / ENGINES[distributed]


def check_launch(
    num_processes: int, distributed: str, machines: Machines, *, resume: bool, overwrite: bool
) -> None:
    """Refuse launch options that cannot work together, before anything is loaded or started."""
    if num_processes < 1:
        raise MoetuneError(f"--num-processes must be >= 1, got {num_processes}")
    engine_config(distributed)  # a known engine, or the error that lists them
    machines.check(num_processes)
    if num_processes == 1 and distributed != "ddp":
        raise MoetuneError(
            f"--distributed {distributed} needs --num-processes 2 or more (1 process trains alone)"
        )
    if resume and overwrite:
        raise MoetuneError(
            "--resume and --overwrite both given; --resume continues a run, --overwrite replaces it"
        )


def inside_distributed_launch() -> bool:
    """True inside `accelerate launch` / torchrun (each process then trains; none re-launches)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ


def launch_run(
    recipe: Recipe,
    run_dir: Path,
    *,
    num_processes: int,
    distributed: str = "ddp",
    machines: Machines = ONE_MACHINE,
    resume: bool = False,
    overwrite: bool = False,
    debug: bool = False,
) -> TrainResult:
    """Train the resolved `recipe` into `run_dir` on `num_processes` processes with the `distributed`
    engine (ENGINES); its result.

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
    env = launch_env(num_processes // machines.num_machines, distributed)
    fixed = machines.main_process_port  # several machines: all of them were given the same port

    def command(port: int) -> list[str]:
        return launch_command(num_processes, fixed or port, args, distributed=distributed, machines=machines)

    rc, err = launch_on_a_free_port(command, env=env, attempts=1 if fixed else 3)
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


def entry_parser() -> argparse.ArgumentParser:
    """The options of `python -m finetune.train` in each launched process (`launch_run` writes them)."""
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
    return parser


def launch_command(
    num_processes: int,
    port: int,
    args: Sequence[str],
    *,
    distributed: str = "ddp",
    machines: Machines = ONE_MACHINE,
) -> list[str]:
    """`accelerate launch` of `python -m finetune.train ARGS` with the bundled config of `distributed`;
    `num_processes` counts the processes of all machines."""
    # One launcher option and its value a line (fmt: skip), then the module and its arguments. The
    # recipe's train.mixed_precision decides the precision, not the launcher.
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(engine_config(distributed)),
        "--num_processes", str(num_processes),
        "--num_machines", str(machines.num_machines),
        "--machine_rank", str(machines.machine_rank),
        "--main_process_port", str(port),
        "--mixed_precision", "no",
        "--dynamo_backend", "no",
    ]  # fmt: skip
    if machines.main_process_ip is not None:
        cmd += ["--main_process_ip", machines.main_process_ip]
    return cmd + ["-m", TRAIN_MODULE, *args]


def launch_env(local_processes: int, distributed: str = "ddp") -> dict[str, str]:
    """The launched processes' environment: this one's, the same `finetune` on their path, and CPU
    processes (one thread share each) when there is no GPU."""
    env = dict(os.environ)
    # The processes import the same `finetune` as this one, from whatever folder they start in.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    if not has_accelerator():
        if distributed == "zero3":  # DeepSpeed's own CPU accelerator (gloo: finetune/accelerator.py)
            env.setdefault("DS_ACCELERATOR", "cpu")
        else:
            env["ACCELERATE_USE_CPU"] = "true"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // local_processes)))
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
