"""DeepSpeed ZeRO-3 on 2 CPU processes (DS_ACCELERATOR=cpu, gloo), LoRA on attention + fused experts.

The run ends with the same adapter as one process with the same global batch (fp32: max |difference|
<= 1e-5), also when it was killed (SIGKILL after a step) and resumed, and plain PEFT loads what it
wrote. Qwen3-MoE is the default family because DeepSpeed makes its sparse block a ZeRO-3 leaf module
(the trap `configure_deepspeed` removes); the built-in model runs through the raw `accelerate launch`
path (slow). The first DeepSpeed launch on a machine compiles DeepSpeed's shared-memory comm op
(about 45 s; cached under torch's extensions folder). DeepSpeed is the `deepspeed` extra, which
`make test` installs.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from finetune.errors import MoetuneError
from finetune.launch import engine_config, launch_on_a_free_port
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
def test_zero3_killed_and_resumed_ends_with_the_one_process_adapter(qwen3, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder, recipe, base = qwen3
    run_dir = folder / "zero3"
    monkeypatch.setenv("MOETUNE_FAILPOINT", "after-step@3")  # SIGKILL both processes after step 3
    with pytest.raises(MoetuneError, match="training on 2 processes failed"):
        launch_training(str(recipe), output_dir=run_dir, num_processes=2, distributed="zero3")
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-")] == [
        "step-000002"
    ]
    assert not (run_dir / "adapter").exists()
    monkeypatch.delenv("MOETUNE_FAILPOINT")

    result = launch_training(
        str(recipe), output_dir=run_dir, num_processes=2, distributed="zero3", resume=True
    )
    assert result.metrics.num_processes == 2  # both processes took part (no silent 1-of-1 runs)
    assert json.loads((run_dir / "history.json").read_text())["train_loss"][0][0] == 1
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
def test_zero3_built_in_model_from_the_raw_accelerate_launch(tmp_path):
    recipe = write_recipe(tmp_path, write_corpus(tmp_path / "train.jsonl", n=64), train=TRAIN)
    launch_training(str(recipe), output_dir=tmp_path / "single", overrides=["train.grad_accum=2"])
    run_dir = tmp_path / "zero3"

    def command(port: int) -> list[str]:
        return [
            sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(engine_config("zero3")),
            "--num_processes", "2", "--main_process_port", str(port),
            str(ROOT / "cli.py"), "train", str(recipe), "--output", str(run_dir),
        ]  # fmt: skip

    rc, err = launch_on_a_free_port(
        command, env=cli_env(DS_ACCELERATOR="cpu"), cwd=ROOT, echo=False, timeout=600
    )
    assert rc == 0, err[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["num_processes"] == 2
    shards = sorted(p.name for p in (run_dir / "checkpoints" / "step-000004" / "pytorch_model").iterdir())
    assert any("rank_1" in name for name in shards)  # partitioned: one optimizer shard per process
    _same_adapter(run_dir, tmp_path / "single")
