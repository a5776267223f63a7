"""Two "machines" of one process each on the loopback address train the quickstart recipe (short) and
end with the adapter of one process with the same global batch: `moetune train --num-machines 2
--machine-rank R --main-process-ip 127.0.0.1 --main-process-port P` on each, and (slow) the plain
`accelerate launch` equivalent. Both machines write into one run folder, as on a shared file system.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from finetune.launch import engine_config
from finetune.train import launch_training
from tests.helpers.runs import ROOT, SHORT, adapter_tensors, cli_command, cli_env

QUICK = [*SHORT, "train.max_steps=3", "train.batch_size=2", "train.warmup_steps=1", "data.max_length=64"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(*extra: str) -> list[str]:
    return [word for value in [*QUICK, *extra] for word in ("--set", value)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, the same global batch of 4: 2 x 2 micro-batches."""
    run_dir = tmp_path_factory.mktemp("multinode") / "single"
    launch_training("quickstart", overrides=[*QUICK, "train.grad_accum=2"], output_dir=run_dir)
    return run_dir


def _run_machines(commands: list[list[str]]) -> None:
    env = cli_env(OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(c, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True) for c in commands]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    for rank, (proc, err) in enumerate(zip(procs, errors)):
        assert proc.returncode == 0, f"machine {rank}: {err[-3000:]}"


def _same_adapter(run_dir, reference):
    ours, theirs = adapter_tensors(run_dir), adapter_tensors(reference)
    assert sorted(ours) == sorted(theirs)
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in theirs)
    assert worst <= 1e-5, f"max |difference| {worst} from the 1-process adapter"
    assert json.loads((run_dir / "metrics.json").read_text())["num_processes"] == 2


def test_two_machines_on_loopback_match_one_process(single, tmp_path):
    run_dir, port = tmp_path / "two-machines", _free_port()
    machines = ["--num-processes", "2", "--num-machines", "2", "--main-process-ip", "127.0.0.1"]
    _run_machines(
        [
            cli_command(
                "train",
                "quickstart",
                *_overrides(),
                "--output",
                str(run_dir),
                *machines,
                "--machine-rank",
                str(rank),
                "--main-process-port",
                str(port),
            )  # fmt: skip
            for rank in (0, 1)
        ]
    )
    _same_adapter(run_dir, single)
    assert (
        run_dir / "checkpoints" / "step-000003" / "random_states_1.pkl"
    ).exists()  # machine 1 saved its part


@pytest.mark.slow
def test_two_machines_with_the_plain_accelerate_launch(single, tmp_path):
    run_dir, port = tmp_path / "accelerate", _free_port()

    def command(rank: int) -> list[str]:
        return [
            sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(engine_config("ddp")),
            "--num_processes", "2", "--num_machines", "2", "--machine_rank", str(rank),
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
            str(ROOT / "cli.py"), "train", "quickstart", *_overrides(), "--output", str(run_dir),
        ]  # fmt: skip

    _run_machines([command(0), command(1)])
    _same_adapter(run_dir, single)
