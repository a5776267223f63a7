"""Memory planning: will this MoE model and LoRA fit on N GPUs, and with which strategy?

Everything is computed on the meta device (no weight memory): the base parameter count comes from
the model built from its config, the trainable count from actually applying the adapter, so the
plan counts exactly what training would create. What the engines add (DDP's gradient buckets, the
parameters FSDP2 / ZeRO-3 gather, ZeRO-3's reduce bucket, the copies made at load) follows the
bundled launch configs; activations and logits are estimates (stated as such). One function per
term: finetune/plan_terms.py; measured against CPU processes: benchmarks/distributed_memory.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from finetune import plan_terms as terms
from finetune.errors import MoetuneError
from finetune.loading import build_empty_model, load_config, parse_dtype

GIB = 1024**3
STRATEGIES = ("auto", "ddp", "fsdp", "zero3")
DEVICES = ("gpu", "cpu")
# What the engine terms assume: the bundled launch configs (recipes/accelerate/).
ENGINE_SETTINGS = {
    "ddp": "torch DDP as Accelerate sets it up (gradient buckets beside the gradients)",
    "fsdp": "FSDP2, one unit per decoder layer, resharded after forward, the next unit prefetched",
    "zero3": "DeepSpeed ZeRO-3 defaults: reduce bucket 5e8 elements, up to 1e9 parameters live",
}
NOT_COUNTED = (
    "the runtime of each process (CUDA context, kernels, communication workspaces)",
    "allocator caching and fragmentation",
    "the data and tokenizer",
)


@dataclass
class MemoryPlan:
    """What `moetune plan` reports: per-GPU memory of LoRA training, and what it assumes."""

    model: str
    gpus: int
    strategy: str  # "ddp" (weights replicated), "fsdp" or "zero3" (weights and LoRA states partitioned)
    quantize: str | None  # routed experts stored int8 / nf4, or None (all weights in the dtype)
    params_total: int
    params_trainable: int
    weights_gib: float  # base weights per GPU (its partition under fsdp / zero3)
    adapter_and_optimizer_gib: float  # LoRA weights + grads + AdamW moments (fp32) per GPU
    gathered_gib: float  # fsdp / zero3: whole parameters held at once besides the partition
    engine_buffers_gib: float  # ddp: gradient buckets; zero3: the reduce bucket
    activations_gib: float  # estimate per GPU for batch_size x seq_len
    logits_gib: float  # the logits, the loss's fp32 log-softmax and its gradient
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
    optimizer: str = "AdamW on the LoRA parameters (fp32 weights, gradients and moments)"
    device: str = "gpu"  # "cpu": a buffer allocated whole counts only as far as it is written
    # every process builds the whole base before the engine splits it (host memory, once)
    load_peak_gib: float = 0.0
    not_counted: tuple[str, ...] = NOT_COUNTED

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
        ]
        if self.strategy != "ddp":
            lines.append(f"  gathered whole at once     {self.gathered_gib:8.2f} GiB")
        if self.engine_buffers_gib:
            what = "gradient buckets" if self.strategy == "ddp" else "reduce bucket"
            lines.append(f"  {what:<27}{self.engine_buffers_gib:8.2f} GiB")
        lines += [
            f"  activations (estimate)     {self.activations_gib:8.2f} GiB",
            f"  logits and loss (estimate) {self.logits_gib:8.2f} GiB",
            f"  total per GPU              {self.total_gib:8.2f} GiB",
            f"  at load (host)             {self.load_peak_gib:8.2f} GiB per process, before the engine splits the base",
            "assumptions:",
            f"  dtype                      {self.dtype} weights and activations",
            f"  batch x sequence           {self.batch_size} x {self.seq_len} tokens per GPU",
            f"  LoRA                       r={self.r}, alpha={2 * self.r} on {', '.join(self.targets)}",
            f"  gradient checkpointing     {'on' if self.gradient_checkpointing else 'off'}",
            f"  optimizer                  {self.optimizer}",
            f"  engine                     {ENGINE_SETTINGS[self.strategy]}",
            f"not counted: {'; '.join(self.not_counted)}",
        ]
        if not self.fits:
            lines.append("  try: more GPUs, a shorter seq_len / batch, or gradient checkpointing")
        return "\n".join(lines)


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
    device: str = "gpu",
) -> MemoryPlan:
    """Per-GPU memory for LoRA training of `spec` on `gpus` GPUs; `strategy` "auto" plans FSDP when
    DDP does not fit, or names one of ddp / fsdp / zero3.

    `quantize` ("int8" / "nf4"; a folder saved quantized uses its own) counts the routed experts in
    that storage format (codes + scales) and the rest of the weights in `dtype`. ZeRO-3 partitions
    parameters, the LoRA weights, their gradients and AdamW states over the processes; quantized
    experts are buffers, which it keeps whole on every process. `device="cpu"` plans CPU processes
    (the tests, benchmarks/distributed_memory.py): a buffer allocated whole but written only in part
    (ZeRO-3's reduce bucket) counts as far as it is written, which is all a CPU makes resident.
    """
    from adapters import apply_lora
    from adapters.targets import count_trainable
    from finetune.loading import check_quantize
    from finetune.quantization.loading import quantization_of
    from finetune.quantization.memory import weight_bytes_by_group

    if gpus < 1:
        raise MoetuneError(f"--gpus must be >= 1 (got {gpus})")
    if strategy not in STRATEGIES:
        raise MoetuneError(f"--strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if device not in DEVICES:
        raise MoetuneError(f"plan device {device!r} is not one of {', '.join(DEVICES)}")
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
    model = apply_lora(model, targets=list(targets), r=r, alpha=2 * r)
    trainable = count_trainable(model)
    activations = terms.activation_bytes(config, batch_size, seq_len, bytes_per, r, gradient_checkpointing)
    logits = terms.logits_bytes(config, batch_size, seq_len, bytes_per, lora_on_head="lm_head" in targets)

    def per_gpu(strategy: str) -> dict[str, float]:
        """Each term of one process's memory under `strategy`, in bytes."""
        split = gpus if strategy in ("fsdp", "zero3") else 1
        return {
            "weights": whole_bytes + (weight_bytes - whole_bytes) / split,
            "lora": terms.lora_state_bytes(trainable, strategy, gpus),
            "gathered": terms.gathered_bytes(model, strategy, bytes_per, method is not None),
            "buffers": terms.engine_buffer_bytes(trainable, strategy, gpus, device),
            "activations": activations,
            "logits": logits,
        }

    if strategy == "auto":
        strategy = "ddp"
        if sum(per_gpu("ddp").values()) > gpu_memory_gib * GIB and gpus > 1:
            strategy = "fsdp"
    parts = per_gpu(strategy)
    needed = sum(parts.values())
    load_peak = terms.load_peak_bytes(weight_bytes, weight_bytes - whole_bytes, trainable, strategy, gpus)
    return MemoryPlan(
        model=str(spec),
        gpus=gpus,
        strategy=strategy,
        quantize=method,
        params_total=total,
        params_trainable=trainable,
        weights_gib=parts["weights"] / GIB,
        adapter_and_optimizer_gib=parts["lora"] / GIB,
        gathered_gib=parts["gathered"] / GIB,
        engine_buffers_gib=parts["buffers"] / GIB,
        activations_gib=activations / GIB,
        logits_gib=logits / GIB,
        total_gib=needed / GIB,
        gpu_memory_gib=gpu_memory_gib,
        fits=needed <= gpu_memory_gib * GIB,
        dtype=str(torch_dtype).removeprefix("torch."),
        batch_size=batch_size,
        seq_len=seq_len,
        r=r,
        targets=tuple(targets),
        gradient_checkpointing=gradient_checkpointing,
        device=device,
        load_peak_gib=load_peak / GIB,
    )
