"""Load a model with quantized experts: quantize-on-load from a float folder, or a quantized folder.

Both go through transformers' `from_pretrained` with the `moetune_experts` quantizer, one difference:
the checkpoint tensors are read with positional reads (safetensors' `pread` backend) instead of
memory maps. transformers keeps every shard mapped until the whole model is loaded, and mapped pages
that were read count as resident memory: quantizing a 2 GB checkpoint on load would peak above the
checkpoint's size although the model ends at a quarter of it. With reads, only the tensor being
converted is resident next to the quantized model (measured in benchmarks/quantized_experts.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, GenerationConfig, PretrainedConfig, PreTrainedModel

from finetune.quantization.quantizer import QUANT_METHOD, ExpertsQuantizationConfig


def quantization_of(config: PretrainedConfig) -> tuple[str | None, str | None]:
    """(quant_method, moetune method) of a saved config: (None, None) for a float checkpoint."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None, None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    quant_method = str(qc.get("quant_method", "unknown"))
    return quant_method, qc.get("method") if quant_method == QUANT_METHOD else None


def load_with_quantized_experts(
    folder: Path,
    config: PretrainedConfig,
    method: str | None,
    *,
    dtype: torch.dtype | str | None,
    device_map=None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """`from_pretrained` of `folder` with its experts quantized by `method` (None: already quantized)."""
    files = sorted(folder.glob("*.safetensors"))
    handles = [safe_open(str(f), framework="pt", backend="pread") for f in files]
    try:
        state_dict = {key: h.get_slice(key) for h in handles for key in h.keys()}  # noqa: SIM118 (lazy slices)
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        model = model_class.from_pretrained(
            None,
            config=config,
            state_dict=state_dict,
            quantization_config=ExpertsQuantizationConfig(method) if method else None,
            dtype=dtype if dtype is not None else "auto",
            device_map=device_map,
            trust_remote_code=trust_remote_code,
        )
    finally:
        for handle in handles:
            handle.__exit__(None, None, None)
    # what from_pretrained(folder) would have set
    model.name_or_path = model.config._name_or_path = str(folder)
    if (folder / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model
