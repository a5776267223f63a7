"""`moetune plan --strategy zero3`: partitioned base and LoRA states, quantized experts kept whole, the
whole base at load; and the partition a process really holds on 2 CPU processes under ZeRO-3."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from finetune.launch import launch_on_a_free_port
from finetune.plan import GIB, plan_memory
from tests.helpers.runs import ROOT, cli_env

TINY = {"targets": ("attention", "experts"), "r": 4, "dtype": "float32", "seq_len": 64}


def test_zero3_divides_the_base_and_the_lora_states_but_not_quantized_experts():
    ddp = plan_memory("preset:small", gpus=4, strategy="ddp")
    zero3 = plan_memory("preset:small", gpus=4, strategy="zero3")
    assert zero3.strategy == "zero3"
    assert zero3.weights_gib == pytest.approx(ddp.weights_gib / 4)
    assert zero3.adapter_and_optimizer_gib == pytest.approx(ddp.adapter_and_optimizer_gib / 4)
    assert zero3.activations_gib == ddp.activations_gib
    # Each process builds the whole base before the engine splits it.
    assert min(zero3.load_peak_gib, ddp.load_peak_gib) > ddp.weights_gib
    assert "at load (host)" in str(zero3)

    q_ddp = plan_memory("preset:small", gpus=4, strategy="ddp", quantize="int8")
    q_zero3 = plan_memory("preset:small", gpus=4, strategy="zero3", quantize="int8")
    # The quantized experts stay whole on every process: more than a quarter of the base per process.
    assert q_ddp.weights_gib / 4 < q_zero3.weights_gib < q_ddp.weights_gib


def test_unknown_strategy_is_a_user_error():
    from finetune import MoetuneError

    with pytest.raises(MoetuneError, match="--strategy 'zero2' is not one of auto, ddp, fsdp, zero3"):
        plan_memory("preset:tiny", strategy="zero2")


# Each process: the tiny model with LoRA, partitioned by deepspeed.initialize (every parameter: the
# persistence threshold is 0), one training step; then the bytes of its partitions.
MEASURE = textwrap.dedent(
    """
    import json, os, sys
    import deepspeed, torch
    from adapters import apply_lora
    from transformers import AutoModelForCausalLM
    from finetune.modeling import preset_config

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = apply_lora(AutoModelForCausalLM.from_config(preset_config("tiny")), targets=["attention", "experts"], r=4)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "leaf_module": {"classes": []}},
    }
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    ids = torch.randint(3, 200, (1, 64))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    held = {"frozen": 0, "trainable": 0}
    for p in engine.module.parameters():
        held["trainable" if p.requires_grad else "frozen"] += p.ds_tensor.numel() * p.ds_tensor.element_size()
    held["parameters"] = sum(1 for _ in engine.module.parameters())
    with open(f"{sys.argv[1]}.{os.environ['RANK']}", "w") as fh:
        json.dump(held, fh)
    """
)


@pytest.mark.slow
def test_plan_matches_the_partition_each_process_holds(tmp_path):
    script = tmp_path / "measure.py"
    script.write_text(MEASURE)
    out = tmp_path / "held"

    def command(port: int) -> list[str]:
        return [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(port), str(script), str(out),
        ]  # fmt: skip

    rc, err = launch_on_a_free_port(
        command, env=cli_env(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"), cwd=ROOT, echo=False, timeout=600
    )
    assert rc == 0, err[-3000:]
    plan = plan_memory("preset:tiny", gpus=2, strategy="zero3", **TINY)
    for rank in (0, 1):
        held = json.loads((tmp_path / f"held.{rank}").read_text())
        padding = held["parameters"] * 4  # a partition is ceil(numel / 2) elements
        assert abs(held["frozen"] - plan.weights_gib * GIB) <= padding, held
        # LoRA weights: 4 of the plan's 16 bytes per trainable parameter (weight, grad, 2 moments)
        assert abs(held["trainable"] - plan.adapter_and_optimizer_gib * GIB * 4 / 16) <= padding, held
