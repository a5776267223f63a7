"""Picking a distributed engine and machines: the launched command, the refusals, the world-size guard.

The runs themselves (2 CPU processes under ZeRO-3, two machines on the loopback address) are in
tests/finetune/test_train_zero3.py and tests/test_train_multinode.py.
"""

from __future__ import annotations

import socket

import pytest
import torch.distributed as dist

from finetune.accelerator import check_world_size, make_accelerator, reset_state
from finetune.errors import MoetuneError
from finetune.launch import ENGINES, Machines, engine_config, launch_command, launch_env
from finetune.recipe import load_recipe
from finetune.train import launch_training
from tests.helpers.runs import write_corpus, write_recipe

# What each bundled config asks Accelerate for.
DISTRIBUTED_TYPE = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "zero3": "DEEPSPEED"}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engines")
    return write_recipe(folder, write_corpus(folder / "train.jsonl", n=16))


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_each_engine_launches_its_bundled_config(engine):
    from accelerate.commands.config.config_args import ClusterConfig

    cmd = launch_command(4, 23456, ["run/recipe.yaml", "--output", "run"], distributed=engine)
    config = cmd[cmd.index("--config_file") + 1]
    assert config == str(engine_config(engine)) and engine_config(engine).is_file()
    assert ClusterConfig.from_yaml_file(config).distributed_type.name == DISTRIBUTED_TYPE[engine]
    assert cmd[cmd.index("--num_processes") + 1] == "4" and cmd[cmd.index("--num_machines") + 1] == "1"
    assert cmd[-5:] == ["-m", "finetune.train", "run/recipe.yaml", "--output", "run"]
    assert "--main_process_ip" not in cmd


def test_machines_are_handed_to_accelerate_launch():
    machines = Machines(num_machines=2, machine_rank=1, main_process_ip="10.0.0.1", main_process_port=29555)
    cmd = launch_command(4, 29555, ["r.yaml"], machines=machines)
    pairs = dict(zip(cmd, cmd[1:]))
    assert pairs["--num_processes"] == "4"  # all machines together, as accelerate counts them
    assert pairs["--num_machines"] == "2" and pairs["--machine_rank"] == "1"
    assert pairs["--main_process_ip"] == "10.0.0.1" and pairs["--main_process_port"] == "29555"


def test_zero3_processes_on_cpus_run_deepspeed_not_accelerates_cpu_mode(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    zero3, ddp = launch_env(2, "zero3"), launch_env(2, "ddp")
    # ACCELERATE_USE_CPU would switch DeepSpeed off (Accelerate's CPU mode is plain data parallel).
    assert zero3["DS_ACCELERATOR"] == "cpu" and "ACCELERATE_USE_CPU" not in zero3
    assert ddp["ACCELERATE_USE_CPU"] == "true" and "DS_ACCELERATOR" not in ddp


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"distributed": "zero2"}, "--distributed 'zero2' is not one of ddp, fsdp, zero3"),
        ({"distributed": "zero3"}, "--distributed zero3 needs --num-processes 2 or more"),
        ({"num_processes": 2, "machines": Machines(num_machines=2)}, "needs --main-process-ip and --main-process-port"),
        ({"num_processes": 2, "machines": Machines(num_machines=2, machine_rank=2)}, "--machine-rank 2 is not one of 0..1"),
        ({"num_processes": 3, "machines": Machines(num_machines=2)}, "--num-processes 3 is not a multiple of --num-machines 2"),
    ],
)  # fmt: skip
def test_engine_and_machine_mistakes_are_refused_before_anything_starts(recipe, tmp_path, kwargs, words):
    with pytest.raises(MoetuneError) as err:
        launch_training(str(recipe), output_dir=tmp_path / "run", **kwargs)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_world_size_guard_names_the_mismatch_in_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_world_size(2)
    with pytest.raises(MoetuneError) as err:
        check_world_size(1)
    assert "launcher started 2 processes (WORLD_SIZE=2) but Accelerate sees 1" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_run_that_sees_fewer_processes_than_launched_stops(recipe, tmp_path, monkeypatch):
    """A real Accelerator over a real process group of 1 while the launcher says 2 (what happens
    when each process sets up its own group): make_accelerator stops before any training."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    # What the launcher exported for the first of 2 processes (Accelerate rewrites some: restored after).
    launched = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    for name, value in {**launched, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    try:
        with pytest.raises(MoetuneError, match=r"WORLD_SIZE=2\) but Accelerate sees 1"):
            make_accelerator(load_recipe(str(recipe)), tmp_path / "run")
    finally:
        reset_state()
        if dist.is_initialized():
            dist.destroy_process_group()


def test_upstream_still_builds_every_model_partitioned_once_a_deepspeed_plugin_is_selected():
    """Why `whole_model_building` exists: Accelerate registers a ZeRO-3 config with transformers
    even with zero3_init_flag false (transformers would then build models inside zero.Init); the
    functions it uses to undo and redo that are still there."""
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    plugin = DeepSpeedPlugin(hf_ds_config={"zero_optimization": {"stage": 3}}, zero3_init_flag=False)
    try:
        plugin.set_deepspeed_weakref()
        assert not plugin.zero3_init_flag and is_deepspeed_zero3_enabled()
        unset_hf_deepspeed_config()
        assert not is_deepspeed_zero3_enabled()
    finally:
        unset_hf_deepspeed_config()
