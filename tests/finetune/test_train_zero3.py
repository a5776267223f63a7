"""DeepSpeed ZeRO-3 on 2 CPU processes (DS_ACCELERATOR=cpu, gloo), LoRA on attention + fused experts.

The run ends with the same adapter as one process with the same global batch (fp32: max |difference|
<= 1e-5), also when it was killed (SIGKILL after a step) and resumed, and plain PEFT loads what it
wrote. By default: Qwen3-MoE (DeepSpeed makes its sparse block a ZeRO-3 leaf module unless
`configure_deepspeed` empties the list) from the raw `accelerate launch` with a DeepSpeed config file of the
user's own that partitions every parameter, so the routed expert path really reads partitioned
weights. Slow: the built-in model through `--distributed zero3` (the bundled config). The first
DeepSpeed launch on a machine compiles DeepSpeed's shared-memory comm op (once; cached under
torch's extensions folder). DeepSpeed is the `deepspeed` extra, which `make test` installs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from finetune.launch import launch_on_a_free_port
from finetune.train import launch_training
from tests.helpers.runs import ROOT, adapter_tensors, cli_env, history, write_corpus, write_recipe

TRAIN = {"max_steps": 4, "batch_size": 2, "grad_accum": 1, "save_every": 2, "log_every": 1, "eval_batches": 3}


def _same_adapter(run_dir, reference):
    ours, theirs = adapter_tensors(run_dir), adapter_tensors(reference)
    assert sorted(ours) == sorted(theirs) and any("experts" in k for k in ours)
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in theirs)
    assert worst <= 1e-5, f"max |difference| {worst} from the 1-process adapter"
    ours, theirs = history(run_dir)["train_loss"], history(reference)["train_loss"]
    assert [s for s, _ in ours] == [s for s, _ in theirs]
    assert [loss for _, loss in ours] == pytest.approx([loss for _, loss in theirs], abs=1e-5)


# A DeepSpeed config of the user's own (deepspeed_config_file): every parameter partitioned. By default
# ZeRO-3 keeps parameters under 1e5 elements whole on every process, which would be every parameter
# of a tiny model; with the threshold at 0 the routed expert path really meets partitioned weights.
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": 1,
    "gradient_clipping": "auto",
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
}


def _launch_config(folder: Path) -> Path:
    """An Accelerate config naming that DeepSpeed file (no mixed_precision key: Accelerate refuses one
    next to a deepspeed_config_file; the recipe decides)."""
    (folder / "ds.json").write_text(json.dumps(DS_CONFIG))
    config = {
        "compute_environment": "LOCAL_MACHINE", "distributed_type": "DEEPSPEED", "num_machines": 1,
        "num_processes": 2, "machine_rank": 0, "use_cpu": False, "rdzv_backend": "static",
        "deepspeed_config": {"deepspeed_config_file": str(folder / "ds.json"), "zero3_init_flag": False},
    }  # fmt: skip
    (folder / "accelerate.yaml").write_text(yaml.safe_dump(config))
    return folder / "accelerate.yaml"


def _accelerate_launch(config: Path, recipe: Path, run_dir: Path, *extra: str, **env: str) -> tuple[int, str]:
    def command(port: int) -> list[str]:
        return [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--num_processes", "2", "--main_process_port", str(port),
            str(ROOT / "cli.py"), "train", str(recipe), "--output", str(run_dir), *extra,
        ]  # fmt: skip

    env = cli_env(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **env)
    return launch_on_a_free_port(command, env=env, cwd=ROOT, echo=False, timeout=600)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    from tests.helpers.models import save
    from tests.helpers.tokenizers import tiny_tokenizer

    folder = tmp_path_factory.mktemp("zero3-qwen3")
    base = save("qwen3_moe", folder / "base", vocab_size=320)
    tiny_tokenizer().save_pretrained(base)
    recipe = write_recipe(
        folder, write_corpus(folder / "train.jsonl", n=64), model={"name": str(base)}, train=TRAIN
    )
    # One process, the same global batch of 4: 2 x 2 micro-batches.
    launch_training(str(recipe), output_dir=folder / "single", overrides=["train.grad_accum=2"])
    return folder, recipe, base


# PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing` in PeftModel.__init__.
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_zero3_killed_and_resumed_ends_with_the_one_process_adapter(qwen3):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder, recipe, base = qwen3
    run_dir, config = folder / "zero3", _launch_config(folder)
    rc, err = _accelerate_launch(config, recipe, run_dir, MOETUNE_FAILPOINT="after-step@3")  # SIGKILL
    assert rc != 0 and "SIGKILL" in err, err[-3000:]
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-")] == [
        "step-000002"
    ]
    assert not (run_dir / "adapter").exists()

    rc, err = _accelerate_launch(config, recipe, run_dir, "--resume")
    assert rc == 0, err[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["num_processes"] == 2  # no silent 1-of-1 runs
    shards = sorted(p.name for p in (run_dir / "checkpoints" / "step-000004" / "pytorch_model").iterdir())
    assert any("rank_1" in name for name in shards)  # partitioned: one optimizer shard per process
    _same_adapter(run_dir, folder / "single")

    # Plain PEFT loads it and computes what the 1-process adapter computes.
    ids = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    outputs = []
    for adapter in (run_dir / "adapter", folder / "single" / "adapter"):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
        with torch.no_grad():
            outputs.append(model(input_ids=ids).logits)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_zero3_built_in_model_with_the_bundled_config(tmp_path):
    recipe = write_recipe(tmp_path, write_corpus(tmp_path / "train.jsonl", n=64), train=TRAIN)
    launch_training(str(recipe), output_dir=tmp_path / "single", overrides=["train.grad_accum=2"])
    run_dir = tmp_path / "zero3"
    result = launch_training(str(recipe), output_dir=run_dir, num_processes=2, distributed="zero3")
    assert result.metrics.num_processes == 2
    _same_adapter(run_dir, tmp_path / "single")


@pytest.mark.slow
def test_zero3_with_int8_experts_matches_one_process(tmp_path):
    """Quantized experts are buffers (codes + scales): ZeRO-3 keeps them whole on every process and
    partitions the rest; the adapter is the 1-process int8 run's."""
    recipe = write_recipe(
        tmp_path, write_corpus(tmp_path / "train.jsonl", n=64), model={"quantize": "int8"}, train=TRAIN
    )
    launch_training(str(recipe), output_dir=tmp_path / "single", overrides=["train.grad_accum=2"])
    run_dir = tmp_path / "zero3"
    rc, err = _accelerate_launch(_launch_config(tmp_path), recipe, run_dir)
    assert rc == 0, err[-3000:]
    _same_adapter(run_dir, tmp_path / "single")
