"""The private Accelerate fields finetune/accelerator.py touches: these tests fail when upstream renames
them or stops reading them, before a training run silently takes another path."""

from __future__ import annotations

import pytest
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from finetune.accelerator import reset_state, switch_to_fsdp


@pytest.fixture
def fresh_state():
    reset_state()
    yield
    reset_state()


def test_a_second_accelerator_with_other_settings_needs_the_reset(fresh_state):
    first = Accelerator(cpu=True)
    assert first.mixed_precision == "no"
    # Why the reset exists: the process-wide state refuses other settings once set.
    with pytest.raises(ValueError, match="already been initialized"):
        Accelerator(cpu=True, mixed_precision="bf16")
    reset_state()
    assert AcceleratorState._shared_state == {} and PartialState._shared_state == {}
    assert GradientState._shared_state == {}
    second = Accelerator(cpu=True, mixed_precision="bf16")
    assert second.mixed_precision == "bf16"


def test_switch_to_fsdp_sets_what_accelerate_and_its_fsdp_helpers_read(fresh_state):
    acc = Accelerator(cpu=True)
    assert acc.distributed_type == DistributedType.NO
    assert PartialState._shared_state["distributed_type"] == DistributedType.NO  # the field we overwrite
    plugin = FullyShardedDataParallelPlugin()
    switch_to_fsdp(acc, plugin)
    assert acc.distributed_type == DistributedType.FSDP  # what prepare() / save_state() branch on
    assert acc.state.fsdp_plugin is plugin
    assert AcceleratorState().distributed_type == DistributedType.FSDP
    assert PartialState().distributed_type == DistributedType.FSDP  # what the FSDP save / load helpers read
