"""Two CPU processes (gloo): DDP through `moetune train --num-processes 2`, FSDP through
`accelerate launch --config_file recipes/accelerate/fsdp.yaml`. The first steps' losses match a
single-process run with the same global batch, and only the main process writes the run's files.

Who writes what is recorded with a Python audit hook (`sys.addaudithook`, installed through a
sitecustomize module on PYTHONPATH): every open-for-writing, rename and mkdir under the run folder,
with the RANK of the process that did it.
"""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

from finetune.launch import launch_on_a_free_port
from finetune.train import launch_training
from tests.helpers.runs import ROOT, adapter_tensors, cli_env, history, write_corpus, write_recipe

AUDIT_HOOK = textwrap.dedent(
    """
    import os, sys
    _root, _log = os.environ.get("MOETUNE_AUDIT_ROOT"), os.environ.get("MOETUNE_AUDIT_LOG")
    if _root and _log:
        _out = open(f"{_log}.{os.environ.get('RANK', 'launcher')}.{os.getpid()}", "a", buffering=1)
        _writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

        def _record(event, path):
            if isinstance(path, (str, bytes, os.PathLike)):
                path = os.path.abspath(os.fsdecode(path))
                if path.startswith(_root):
                    _out.write(f"{event}\\t{path}\\n")

        def _hook(event, args):
            if event == "open":
                path, mode, flags = args
                if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                    mode is None and isinstance(flags, int) and flags & _writing
                ):
                    _record("write", path)
            elif event == "os.rename":
                _record("rename", args[1])
            elif event == "os.mkdir":
                _record("mkdir", args[0])

        sys.addaudithook(_hook)
    """
)

# What a process other than the main one may write: its own RNG state and its shard of an FSDP
# checkpoint, inside the temporary checkpoint folder that the main process then renames.
RANK1_ALLOWED = (".tmp-step-", "random_states_1.pkl", "__1_0.distcp", "pytorch_model_fsdp_0", "optimizer_0")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    corpus = write_corpus(folder / "train.jsonl", n=64)
    train = {"max_steps": 3, "batch_size": 2, "grad_accum": 1, "save_every": 2, "log_every": 1}
    recipe = write_recipe(folder, corpus, train={**train, "eval_batches": 3})  # 3: one process gets 1 batch
    # One process, the same global batch of 4: 2 x 2 micro-batches.
    launch_training(str(recipe), output_dir=folder / "single", overrides=["train.grad_accum=2"])
    audit = folder / "audit"
    audit.mkdir()
    (audit / "sitecustomize.py").write_text(AUDIT_HOOK)
    return folder, recipe, audit


def _audit_env(audit, run_dir, **extra):
    env = cli_env(MOETUNE_AUDIT_ROOT=str(run_dir), MOETUNE_AUDIT_LOG=str(audit / "log"), **extra)
    env["PYTHONPATH"] = f"{audit}:{env['PYTHONPATH']}"
    return env


def _writes(audit, rank):
    rows = []
    for log in audit.glob(f"log.{rank}.*"):
        rows += [line.split("\t") for line in log.read_text().splitlines()]
    return rows


def _check(folder, run_dir, audit):
    single, multi = history(folder / "single"), history(run_dir)
    assert len(multi["train_loss"]) == 3
    for (s1, a), (s2, b) in zip(single["train_loss"], multi["train_loss"]):
        assert s1 == s2
        assert a == pytest.approx(b, abs=1e-3), f"step {s1}: 1 process {a} vs 2 processes {b}"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["num_processes"] == 2
    assert metrics["eval_loss_after"] == pytest.approx(
        json.loads((folder / "single" / "metrics.json").read_text())["eval_loss_after"], abs=1e-3
    )
    for key, value in adapter_tensors(folder / "single").items():
        assert (adapter_tensors(run_dir)[key] - value).abs().mean() < 1e-4, key

    main = _writes(audit, 0)
    assert any(path.endswith("adapter_config.json") for _, path in main)  # the hook saw the main process
    assert any(path.endswith("metrics.json") for _, path in main)
    others = _writes(audit, 1) + _writes(audit, "launcher")
    strays = [
        (event, path)
        for event, path in others
        if "/checkpoints/.tmp-step-" not in path or not path.rsplit("/", 1)[-1].startswith(RANK1_ALLOWED)
    ]
    assert not strays, f"processes other than the main one wrote: {strays[:5]}"


def test_ddp_two_processes_match_one_process_and_only_the_main_process_writes(setup, monkeypatch):
    folder, recipe, audit = setup
    run_dir = folder / "ddp"
    for key, value in _audit_env(audit, run_dir).items():
        monkeypatch.setenv(key, value)
    launch_training(str(recipe), output_dir=run_dir, num_processes=2)  # re-launches via accelerate
    _check(folder, run_dir, audit)
    assert (run_dir / "checkpoints" / "step-000002" / "random_states_1.pkl").exists()


def test_fsdp_two_processes_from_the_bundled_config(setup):
    folder, recipe, audit = setup
    run_dir = folder / "fsdp"
    for old in audit.glob("log.*"):
        old.unlink()

    def command(port: int) -> list[str]:
        return [
            sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(ROOT / "recipes" / "accelerate" / "fsdp.yaml"),
            "--num_processes", "2", "--main_process_port", str(port),
            str(ROOT / "cli.py"), "train", str(recipe), "--output", str(run_dir),
        ]  # fmt: skip

    # the launcher binds the port itself: a port taken in between is retried, never a flaky failure
    rc, err = launch_on_a_free_port(
        command, env=_audit_env(audit, run_dir), cwd=ROOT, echo=False, timeout=600
    )
    assert rc == 0, err[-3000:]
    # sharded checkpoint: one piece per process
    shards = sorted(
        p.name for p in (run_dir / "checkpoints" / "step-000002" / "pytorch_model_fsdp_0").iterdir()
    )
    assert "__0_0.distcp" in shards and "__1_0.distcp" in shards
    _check(folder, run_dir, audit)
    assert torch.isfinite(torch.cat([v.flatten() for v in adapter_tensors(run_dir).values()])).all()
