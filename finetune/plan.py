"""Memory planning: will this MoE model and LoRA fit on N GPUs, and with which strategy?

Everything is computed on the meta device (no weight memory): the base parameter count comes from
the model built from its config, the trainable count from actually applying the adapter, so the
plan counts exactly what training would create. Activations are an estimate (stated as such):
per layer, the residual stream and attention / expert intermediates kept for backward, divided by
the checkpointing factor when gradient checkpointing is on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from finetune.errors import MoetuneError
from finetune.loading import build_empty_model, load_config, parse_dtype

GIB = 1024**3
STRATEGIES = ("auto", "ddp", "fsdp", "zero3")


@dataclass
class MemoryPlan:
    """What `moetune plan` reports: per-GPU memory of LoRA training, and what it assumes."""

    model: str
    gpus: int
    strategy: str  # "ddp" (weights replicated), "fsdp" or "zero3" (weights and LoRA states partitioned)
    quantize: str | None  # routed experts stored int8 / nf4, or None (all weights in the dtype)
    params_total: int
    params_trainable: int
    weights_gib: float  # base weights per GPU
    adapter_and_optimizer_gib: float  # LoRA weights + grads + AdamW states (fp32) per GPU
    activations_gib: float  # estimate per GPU for batch_size x seq_len
    total_gib: float
    gpu_memory_gib: float
    fits: bool
    # the assumptions the numbers rest on
    dtype: str = "bfloat16"
    batch_size: int = 1
    seq_len: int = 4096
    r: int = 16
    targets: tuple[str, ...] = ("attention", "experts")
    gradient_checkpointing: bool = True
    optimizer: str = "AdamW on the LoRA parameters: fp32 moments and master copy"
    # zero3: each process loads the whole base before DeepSpeed partitions it (host memory, once)
    load_peak_gib: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON of `moetune plan --json`."""
        return asdict(self)

    def __str__(self) -> str:
        """The plan as `moetune plan` prints it: the verdict, the memory per GPU, the assumptions."""
        verdict = "fits" if self.fits else "does NOT fit"
        lines = [
            f"{self.model} on {self.gpus} GPU(s) of {self.gpu_memory_gib:.0f} GiB: {verdict} ({self.strategy})",
            f"  params total / trainable   {self.params_total:,} / {self.params_trainable:,}",
            f"  base weights per GPU       {self.weights_gib:8.2f} GiB"
            + (f"  (routed experts {self.quantize})" if self.quantize else ""),
            f"  LoRA + grads + AdamW       {self.adapter_and_optimizer_gib:8.2f} GiB",
            f"  activations (estimate)     {self.activations_gib:8.2f} GiB",
            f"  total per GPU              {self.total_gib:8.2f} GiB",
        ]
        if self.load_peak_gib is not None:
            lines.append(
                f"  whole base at load (host)  {self.load_peak_gib:8.2f} GiB per process, before partitioning"
            )
        lines += [
            "assumptions:",
            f"  dtype                      {self.dtype} weights and activations",
            f"  batch x sequence           {self.batch_size} x {self.seq_len} tokens per GPU",
            f"  LoRA                       r={self.r}, alpha={2 * self.r} on {', '.join(self.targets)}",
            f"  gradient checkpointing     {'on' if self.gradient_checkpointing else 'off'}",
            f"  optimizer                  {self.optimizer}",
        ]
        if not self.fits:
            lines.append("  try: more GPUs, a shorter seq_len / batch, or gradient checkpointing")
        return "\n".join(lines)


def _trainable_after_lora(model: torch.nn.Module, adapter: dict[str, Any]) -> int:
    from adapters import apply_lora
    from adapters.targets import count_trainable

    return count_trainable(apply_lora(model, **adapter))


def _activation_bytes(
    config: Any, batch_size: int, seq_len: int, bytes_per: int, checkpointing: bool
) -> float:
    """Rough per-layer activation memory kept for backward, times layers."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = text.hidden_size
    top_k = getattr(text, "num_experts_per_tok", 1) or 1
    expert_width = getattr(text, "moe_intermediate_size", None) or text.intermediate_size
    tokens = batch_size * seq_len
    # residual + norms + q/k/v/o (~8 H) and routed expert intermediates (3 I per routed pair)
    per_layer = tokens * (8 * hidden + 3 * top_k * expert_width) * bytes_per
    if checkpointing:  # only the layer inputs are kept; one layer is recomputed at a time
        return tokens * hidden * bytes_per * text.num_hidden_layers + per_layer
    return per_layer * text.num_hidden_layers


def plan_memory(
    spec: str,
    *,
    gpus: int = 1,
    gpu_memory_gib: float = 80.0,
    dtype: str = "bfloat16",
    targets: tuple[str, ...] = ("attention", "experts"),
    r: int = 16,
    batch_size: int = 1,
    seq_len: int = 4096,
    gradient_checkpointing: bool = True,
    quantize: str | None = None,
    strategy: str = "auto",
) -> MemoryPlan:
    """Per-GPU memory for LoRA training of `spec` on `gpus` GPUs; `strategy` "auto" plans FSDP when
    DDP does not fit, or names one of ddp / fsdp / zero3.

    `quantize` ("int8" / "nf4"; a folder saved quantized uses its own) counts the routed experts in
    that storage format (codes + scales) and the rest of the weights in `dtype`. ZeRO-3 partitions
    parameters, the LoRA weights, their gradients and AdamW states over the processes; quantized
    experts are buffers, which it keeps whole on every process.
    """
    from finetune.loading import check_quantize
    from finetune.quantization.loading import quantization_of
    from finetune.quantization.memory import weight_bytes_by_group

    if gpus < 1:
        raise MoetuneError(f"--gpus must be >= 1 (got {gpus})")
    if strategy not in STRATEGIES:
        raise MoetuneError(f"--strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    torch_dtype = parse_dtype(dtype)
    if not isinstance(torch_dtype, torch.dtype):
        raise MoetuneError(f"plan needs a concrete --dtype (float32, bfloat16, float16), not {dtype!r}")
    bytes_per = torch.finfo(torch_dtype).bits // 8
    config = load_config(spec)
    method = check_quantize(quantize) or quantization_of(config)[1]
    model = build_empty_model(config)
    total = sum(p.numel() for p in model.parameters())
    by_group = weight_bytes_by_group(model, bytes_per, method)
    weight_bytes = sum(by_group.values())
    whole_bytes = by_group.get("experts", 0) if method else 0  # quantized experts: buffers, never partitioned
    trainable = _trainable_after_lora(model, {"targets": list(targets), "r": r, "alpha": 2 * r})
    # LoRA weights + grads in the training dtype, AdamW moments and an fp32 master copy.
    adapter_bytes = trainable * (2 * bytes_per + 12)
    activations = _activation_bytes(config, batch_size, seq_len, bytes_per, gradient_checkpointing)

    def per_gpu(strategy: str) -> tuple[float, float, float]:
        """(base weights, LoRA + grads + AdamW, total) per GPU."""
        if strategy == "zero3":
            weights = whole_bytes + (weight_bytes - whole_bytes) / gpus
            return weights, adapter_bytes / gpus, weights + adapter_bytes / gpus + activations
        weights = weight_bytes / (gpus if strategy == "fsdp" else 1)
        return weights, adapter_bytes, weights + adapter_bytes + activations

    if strategy == "auto":
        strategy = "ddp"
        if per_gpu("ddp")[2] > gpu_memory_gib * GIB and gpus > 1:
            strategy = "fsdp"
    weights, adapter_share, needed = per_gpu(strategy)
    return MemoryPlan(
        model=str(spec),
        gpus=gpus,
        strategy=strategy,
        quantize=method,
        params_total=total,
        params_trainable=trainable,
        weights_gib=weights / GIB,
        adapter_and_optimizer_gib=adapter_share / GIB,
        activations_gib=activations / GIB,
        total_gib=needed / GIB,
        gpu_memory_gib=gpu_memory_gib,
        fits=needed <= gpu_memory_gib * GIB,
        dtype=str(torch_dtype).removeprefix("torch."),
        batch_size=batch_size,
        seq_len=seq_len,
        r=r,
        targets=tuple(targets),
        gradient_checkpointing=gradient_checkpointing,
        load_peak_gib=weight_bytes / GIB if strategy == "zero3" else None,
    )
