"""What the finetune/ commands return: result objects whose str() is what the command prints and,
for the commands with --json, whose as_dict() is the JSON."""

from __future__ import annotations

from finetune.info import model_info
from finetune.loading import init_model
from finetune.plan import plan_memory
from finetune.recipe import list_recipes


def test_info_json_leaves_out_the_keys_that_do_not_apply():
    plain = model_info("preset:tiny").as_dict()
    assert list(plain)[:2] == ["kind", "model"] and plain["kind"] == "model"
    assert not {"encoders", "quantize", "weight_bytes_quantized"} & set(plain)
    quantized = model_info("preset:tiny", quantize="int8").as_dict()
    assert quantized["quantize"] == "int8"
    assert quantized["weight_bytes_quantized"]["experts"] < quantized["weight_bytes"]["experts"]
    table = str(model_info("preset:tiny", quantize="int8"))
    assert table.splitlines()[0] == "preset:tiny" and "experts int8" in table


def test_plan_prints_its_verdict_and_assumptions():
    plan = plan_memory("preset:full", gpus=1, gpu_memory_gib=24)
    text = str(plan)
    assert text.startswith("preset:full on 1 GPU(s) of 24 GiB: does NOT fit (ddp)")
    assert "try: more GPUs" in text and plan.as_dict()["fits"] is False


def test_init_model_says_what_it_wrote_and_where(tmp_path):
    written = init_model("tiny", tmp_path / "m", seed=1)
    assert written.folder == tmp_path / "m" and (written.folder / "config.json").is_file()
    assert str(written) == f"wrote a random-initialised 'tiny' model and its tokenizer to {tmp_path / 'm'}"


def test_recipes_print_one_line_each():
    recipes = list_recipes()
    lines = str(recipes).splitlines()
    assert len(lines) == len(recipes) > 0
    name, description = recipes[0]
    assert lines[0].startswith(name) and lines[0].endswith(description)
