"""Write checkpoints with quantized experts: `moetune quantize` and `init-model --quantize`.

`save_quantized` writes a model that `finetune.loading.load_model(spec, quantize=...)` loaded with its
experts quantized on load (shard by shard, see finetune.quantization.loading): safetensors with `<weight>_qweight` / `<weight>_qscale`
tensors and `quantization_config` in config.json, which `from_pretrained` reads back after
`import finetune`.

`init_quantized_preset` writes a random-initialised built-in preset directly in quantized form, one
top-level block at a time (embeddings, each decoder layer, final norm, lm_head): the block is
materialised in the compute dtype, initialised, its experts quantized, its tensors written to the
current shard, and the block freed. The full preset (19.2B parameters, 77 GB in fp32) is never
held in full precision; the peak is one decoder layer in bf16 plus one shard being filled.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from finetune.quantization.experts import is_quantized, quantizable, quantize_experts_
from finetune.quantization.quantizer import ExpertsQuantizationConfig

DEFAULT_SHARD_BYTES = 2 * 10**9
logger = logging.getLogger("moetune")


def parse_size(size: str | int | None) -> int:
    """'2GB' / '500MB' / an int of bytes -> bytes (transformers' decimal units)."""
    if size is None:
        return DEFAULT_SHARD_BYTES
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


class ShardWriter:
    """Collects tensors and writes safetensors shards of at most `max_bytes` (one tensor may exceed
    it alone), then the index transformers reads (`model.safetensors.index.json`)."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.detach().contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"model-part-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(self.folder / name), metadata={"format": "pt"})
        self.files.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        """Final names `model-0000i-of-0000n.safetensors` (or `model.safetensors`) and the index."""
        self.flush()
        count = len(self.files)
        weight_map = {}
        for i, (old, names) in enumerate(self.files, start=1):
            new = "model.safetensors" if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
            os.replace(self.folder / old, self.folder / new)
            weight_map.update(dict.fromkeys(names, new))
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(
                json.dumps(index, indent=2, sort_keys=True)
            )


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The pieces to materialise one at a time, in the order transformers initialises them: the root's
    children in order, the base model's children expanded (each decoder layer is a piece)."""
    blocks = []
    for name, child in model.named_children():
        if name != model.base_model_prefix:
            blocks.append((name, child))
            continue
        for sub, grandchild in child.named_children():
            if isinstance(grandchild, nn.ModuleList):
                blocks += [(f"{name}.{sub}.{i}", layer) for i, layer in enumerate(grandchild)]
            else:
                blocks.append((f"{name}.{sub}", grandchild))
    return blocks


def _post_order(module: nn.Module):
    """Children before their parent, as transformers' `initialize_weights` visits modules."""
    for child in module.children():
        yield from _post_order(child)
    yield module


def _init_parametrized(block: nn.Module) -> None:
    """Give parametrized weights (e.g. Wav2Vec2's weight-normed position convolution) real stored values.

    `to_empty` leaves every tensor uninitialised, and transformers' `_init_weights` writes to the
    derived weight of a parametrization, which stores nothing: the tensors behind it (weight norm's
    g and v) would keep whatever memory held. Assigning a freshly drawn weight goes through the
    parametrization's `right_inverse`, which sets them.
    """
    for module in block.modules():
        for name in getattr(module, "parametrizations", {}):
            fresh = torch.empty_like(getattr(module, name))
            torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5))  # torch's default for Linear / Conv weights
            setattr(module, name, fresh)


def _init_functions(model: PreTrainedModel) -> dict[int, Callable[[nn.Module], None]]:
    """id(module) -> the `_init_weights` transformers' `initialize_weights` applies to it: that of the
    nearest enclosing PreTrainedModel (a multimodal model's encoders initialise themselves)."""
    owners: dict[int, Callable[[nn.Module], None]] = {}

    def walk(module: nn.Module, init: Callable[[nn.Module], None]) -> None:
        if isinstance(module, PreTrainedModel):
            init = module._init_weights
        owners[id(module)] = init
        for child in module.children():
            walk(child, init)

    walk(model, model._init_weights)
    return owners


def init_quantized_preset(
    config: PretrainedConfig,
    output: Path,
    method: str,
    *,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    max_shard_size: str | int | None = None,
) -> None:
    """Write a random-initialised model of `config` with quantized experts into `output` (see module doc).

    Logs one line per block (logger `moetune`, level INFO): the full preset takes minutes.
    """
    config.quantization_config = ExpertsQuantizationConfig(method).to_dict()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    writer = ShardWriter(output, parse_size(max_shard_size))
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        tied = (
            {id(p) for p in model.get_output_embeddings().parameters()}
            if config.tie_word_embeddings
            else set()
        )
        written = set()
        blocks = _blocks(model)
        init = _init_functions(model)
        for i, (prefix, block) in enumerate(blocks):
            if tied and {id(p) for p in block.parameters()} <= tied and written:
                continue  # lm_head tied to the embeddings: written once
            block.to_empty(device="cpu")
            with torch.no_grad():
                _init_parametrized(block)
                for module in _post_order(block):  # transformers' init order: the same random weights
                    init[id(module)](module)
            for module in block.modules():
                if quantizable(module) and not is_quantized(module):
                    quantize_experts_(module, method)
            for name, tensor in block.state_dict().items():
                writer.add(f"{prefix}.{name}", tensor)
            written.add(prefix)
            block.to_empty(device="meta")  # free the block before the next one
            logger.info("init-model: wrote %s (%d/%d blocks)", prefix, i + 1, len(blocks))
        writer.close()
    finally:
        torch.random.set_rng_state(generator_state)
    config.dtype = dtype
    config.save_pretrained(output)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(output)


def save_quantized(model, tokenizer, output: Path, *, max_shard_size: str | int | None = None) -> Path:
    """Write a model loaded with quantized experts (`load_model(spec, quantize=...)`) and its tokenizer."""
    model.save_pretrained(output, max_shard_size=parse_size(max_shard_size))
    if tokenizer is not None:
        tokenizer.save_pretrained(output)
    return output
