"""Quantized experts on disk: quantize-on-load, `moetune quantize`, `init-model --quantize`, loading
through transformers after `import finetune`, what info / plan report, and the bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import finetune  # noqa: F401  (registers the built-in model and the quantizer)
from finetune.errors import MoetuneError
from finetune.info import model_info
from finetune.loading import init_model, load_model, quantize_model
from finetune.modeling import preset_config
from finetune.plan import plan_memory
from finetune.quantization import quantize_model_experts_
from finetune.quantization.checkpoint import init_quantized_preset
from finetune.quantization.experts import is_quantized
from tests.helpers.models import FAMILIES, build, random_batch, save
from tests.helpers.runs import cli_env, run_cli


def _codes(model):
    return {k: v for k, v in model.state_dict().items() if k.endswith(("_qweight", "_qscale"))}


@pytest.mark.parametrize("method", ["int8", "nf4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_on_load_equals_quantizing_the_loaded_model(tmp_path, family, method):
    """Per-expert checkpoints (DeepSeek-V3, Qwen3-MoE, Mixtral) are fused by transformers first."""
    folder = save(family, tmp_path / "float")
    loaded, _ = load_model(str(folder), quantize=method)
    reference = build(family)
    quantize_model_experts_(reference, method)
    codes, want = _codes(loaded), _codes(reference)
    assert codes.keys() == want.keys() and codes
    for key, value in want.items():
        assert torch.equal(codes[key], value), key
    assert not any(p.ndim == 3 for p in loaded.parameters())  # no float expert stack left behind
    batch = random_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, reference(**batch).logits)


@pytest.mark.parametrize("family", ["moetune", "qwen3_moe"])
def test_a_quantized_folder_loads_with_plain_transformers_after_import_finetune(tmp_path, family):
    save(family, tmp_path / "float")
    model, _ = load_model(str(tmp_path / "float"), quantize="nf4")
    model.save_pretrained(tmp_path / "nf4")
    config = json.loads((tmp_path / "nf4" / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "moetune_experts", "method": "nf4", "block_size": 64, "quantized": "routed experts"
    }  # fmt: skip
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "nf4")
    assert any(is_quantized(m) for m in again.modules())
    for key, value in _codes(model).items():
        assert torch.equal(_codes(again)[key], value), key
    batch = random_batch()
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model(**batch).logits)
    # load_model reads it as it is, or with its own method; another method is refused
    assert any(is_quantized(m) for m in load_model(str(tmp_path / "nf4"))[0].modules())
    load_model(str(tmp_path / "nf4"), quantize="nf4")
    with pytest.raises(MoetuneError, match="stored as nf4, but quantize='int8'"):
        load_model(str(tmp_path / "nf4"), quantize="int8")


def test_moetune_quantize_and_init_model_quantize_through_the_cli(tmp_path):
    init_model("tiny", tmp_path / "tiny")
    done = run_cli("quantize", str(tmp_path / "tiny"), "--method", "int8", "--output", str(tmp_path / "q8"))
    assert done.returncode == 0, done.stderr
    model, tokenizer = load_model(str(tmp_path / "q8"))
    assert tokenizer is not None and model.config.quantization_config.method == "int8"
    done = run_cli("init-model", "--preset", "tiny", "--quantize", "nf4", "--output", str(tmp_path / "tq"))
    assert done.returncode == 0, done.stderr
    done = run_cli("generate", str(tmp_path / "tq"), "--prompt", "def ", "--max-new-tokens", "4")
    assert done.returncode == 0 and done.stdout.strip(), done.stderr
    done = run_cli("info", str(tmp_path / "tq"), "--json")
    info = json.loads(done.stdout)
    assert info["quantize"] == "nf4"
    assert info["weight_bytes_quantized"]["experts"] < 0.3 * info["weight_bytes"]["experts"]
    assert info["weight_bytes_quantized"]["attention"] == info["weight_bytes"]["attention"]
    # the output of a quantize that failed half-way is never a finished folder
    done = run_cli("quantize", str(tmp_path / "q8"), "--method", "nf4", "--output", str(tmp_path / "bad"))
    assert done.returncode == 2 and "stored as int8" in done.stderr and not (tmp_path / "bad").exists()


def test_init_model_quantize_writes_block_by_block_exactly_the_whole_model_result(tmp_path):
    """The streaming writer (one block in memory, several shards) equals initialising the whole model
    at once with transformers' own routine and quantizing it."""
    init_quantized_preset(
        preset_config("tiny"), tmp_path, "nf4", dtype=torch.float32, seed=3, max_shard_size=200_000
    )
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    written = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.manual_seed(3)
    with torch.device("meta"):
        whole = AutoModelForCausalLM.from_config(preset_config("tiny"))
    whole.to_empty(device="cpu")
    whole.initialize_weights()
    quantize_model_experts_(whole, "nf4")
    got, want = written.state_dict(), whole.state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def test_a_multimodal_model_is_written_with_quantized_experts_and_runs(tmp_path, monkeypatch):
    """Every tensor gets a value: memory that `to_empty` hands out is filled with NaN here, so a tensor
    the writer forgot to initialise (e.g. behind a weight-norm parametrization) cannot pass by luck."""
    from PIL import Image
    from torch import nn

    to_empty = nn.Module.to_empty

    def to_empty_with_nan(self, *, device, recurse=True):
        module = to_empty(self, device=device, recurse=recurse)
        with torch.no_grad():
            for tensor in [*self.parameters(), *self.buffers()]:
                if tensor.is_floating_point():
                    tensor.fill_(float("nan"))
        return module

    monkeypatch.setattr(nn.Module, "to_empty", to_empty_with_nan)
    init_model("tiny", tmp_path / "mm", modalities=["image", "audio", "text"], quantize="nf4")
    monkeypatch.undo()
    model, processor = load_model(str(tmp_path / "mm"))
    assert any(is_quantized(m) for m in model.modules())
    assert all(
        torch.isfinite(t).all() for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()
    )
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(image)
    from finetune.data.multimodal import prepare_multimodal_inputs

    inputs = prepare_multimodal_inputs(processor, "a", image=str(image))
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_info_and_plan_count_quantized_experts():
    info = model_info("preset:full", quantize="nf4")
    before, after = info.weight_bytes, info.weight_bytes_quantized
    assert after["experts"] / before["experts"] == pytest.approx((0.5 + 4 / 64) / 4, rel=1e-3)  # fp32 -> NF4
    assert all(after[g] == before[g] for g in before if g != "experts")
    full = plan_memory("preset:full", gpus=1, gpu_memory_gib=24, quantize="nf4")
    assert full.fits and full.quantize == "nf4"
    assert not plan_memory("preset:full", gpus=1, gpu_memory_gib=24).fits
    int8 = plan_memory("preset:full", gpus=1, gpu_memory_gib=80, quantize="int8")
    assert full.weights_gib < int8.weights_gib < plan_memory("preset:full", gpus=1).weights_gib


def test_bad_inputs_are_one_line_each(tmp_path):
    with pytest.raises(MoetuneError, match="unknown method 'int4'; use int8 or nf4"):
        load_model("preset:tiny", quantize="int4")
    folder = save("qwen3_moe", tmp_path / "fp8")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoetuneError, match=r"already quantized \(fp8\); moetune quantizes float"):
        load_model(str(folder), quantize="nf4")
    with pytest.raises(
        MoetuneError, match="no weights to quantize; create it quantized with `moetune init-model"
    ):
        quantize_model("preset:full", tmp_path / "out", "nf4")
    init_model("tiny", tmp_path / "base")
    quantize_model(str(tmp_path / "base"), tmp_path / "q", "nf4")
    done = run_cli("merge", str(tmp_path / "q"), "--adapter", str(tmp_path), "--output", str(tmp_path / "m"))
    assert done.returncode == 2 and "merge needs the full-precision base" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "m").exists()
    done = run_cli(
        "init-model", "--preset", "tiny", "--quantize", "int4", "--output", str(tmp_path / "x"), env=cli_env()
    )
    assert done.returncode == 2 and "invalid choice: 'int4'" in done.stderr


def test_preset_quantized_in_memory_saves_a_loadable_folder(tmp_path):
    model, tokenizer = load_model("preset:tiny", quantize="int8")
    model.save_pretrained(tmp_path / "q")
    again, _ = load_model(str(tmp_path / "q"))
    for key, value in _codes(model).items():
        assert torch.equal(_codes(again)[key], value)
    assert (
        preset_config("tiny").num_experts
        == again.model.layers[0].mlp.experts.quantized_shapes["down_proj"].num_experts
    )


def test_generate_and_experts_profile_take_quantize(tmp_path):
    """`--quantize` on generate and experts profile loads the float folder with quantized experts."""
    import cli

    init_model("tiny", tmp_path / "base")
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n"}) for i in range(8)))
    argv = [
        "experts",
        "profile",
        str(tmp_path / "base"),
        "--data",
        str(data),
        "--output",
        str(tmp_path / "p"),
    ]
    assert cli.main([*argv, "--quantize", "nf4"]) == 0
    quantized = json.loads((tmp_path / "p" / "expert_stats.json").read_text())
    assert cli.main([*argv[:-1], str(tmp_path / "f")]) == 0
    plain = json.loads((tmp_path / "f" / "expert_stats.json").read_text())
    assert quantized.keys() == plain.keys() and quantized != plain  # NF4 experts route differently
    assert cli.main(["generate", str(tmp_path / "base"), "--prompt", "def ", "--quantize", "int8"]) == 0


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_quantize_on_load_reads_and_quantizes_one_expert_at_a_time(tmp_path, family, monkeypatch):
    """The model's per-expert -> fused merge only ever sees one expert: no float stack while loading."""
    from transformers.core_model_loading import MergeModulelist

    folder = save(family, tmp_path / "float")
    seen: list[int] = []
    merge = MergeModulelist.convert

    def spy(self, input_dict, *args, **kwargs):
        seen.extend(len(v) for v in input_dict.values())
        return merge(self, input_dict, *args, **kwargs)

    monkeypatch.setattr(MergeModulelist, "convert", spy)
    loaded, _ = load_model(str(folder), quantize="nf4")
    assert seen and set(seen) == {1}
    assert any(is_quantized(m) for m in loaded.modules())
    seen.clear()
    load_model(str(folder))  # unquantized loading keeps transformers' own stacking
    assert max(seen) > 1


@pytest.mark.gpu
def test_quantize_on_load_to_cuda_keeps_codes_on_the_gpu_equal_to_the_cpu_ones(tmp_path):
    folder = save("qwen3_moe", tmp_path / "float")
    on_gpu, _ = load_model(str(folder), quantize="nf4", device_map="cuda")
    on_cpu, _ = load_model(str(folder), quantize="nf4")
    gpu_codes, cpu_codes = _codes(on_gpu), _codes(on_cpu)
    assert gpu_codes.keys() == cpu_codes.keys() and gpu_codes
    for key, value in cpu_codes.items():
        assert gpu_codes[key].is_cuda and torch.equal(gpu_codes[key].cpu(), value), key


def test_only_per_expert_merges_are_replaced_by_the_per_expert_converter():
    """Joining stacks already fused on disk (no per-expert merge first) must stay transformers' own."""
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

    from finetune.quantization.quantizer import (
        ExpertsQuantizationConfig,
        ExpertsQuantizer,
        PerExpertQuantizingConverter,
    )

    def converter(*ops):
        return WeightConverter(
            ["experts.*.gate.weight", "experts.*.up.weight"], "experts.gate_up", operations=list(ops)
        )

    quantizer = ExpertsQuantizer(ExpertsQuantizationConfig("nf4"), pre_quantized=False)  # quantize on load
    per_expert = [converter(MergeModulelist(0), Concatenate(1)), converter(MergeModulelist(0))]
    fused = [
        converter(Concatenate(1)),
        converter(Concatenate(0)),
        converter(MergeModulelist(0), Concatenate(0)),
    ]
    updated = quantizer.update_weight_conversions(per_expert + fused, build("qwen3_moe"))
    kinds = [type(c) is PerExpertQuantizingConverter for c in updated[: len(per_expert) + len(fused)]]
    assert kinds == [True, True, False, False, False]
