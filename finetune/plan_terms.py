"""The terms of `moetune plan`: bytes per process of each part of a LoRA run, with where they come from.

One function per term, each from the meta-device model and the config, so the plan (finetune/plan.py)
stays a sum a reader can check. The engine terms follow what the bundled launch configs
(recipes/accelerate/) give torch DDP, Accelerate's FSDP2 and DeepSpeed ZeRO-3; benchmarks/
distributed_memory.py measures them on 2 CPU processes (docs/scaling.md: plan vs measured).

Not counted anywhere (said in the plan's output too): the runtime of a process (CUDA context,
kernels, communication workspaces), allocator caching and fragmentation, and the data.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

# PEFT keeps LoRA weights in fp32 whatever the base dtype (its autocast_adapter_dtype), so a trainable
# parameter costs its weight, its gradient and AdamW's two moments in fp32 (no separate master copy).
LORA_BYTES = 4 + 4 + 8
# torch DDP copies the gradients into buckets for the all-reduce (Accelerate keeps
# gradient_as_bucket_view off), and at wrap time broadcasts the module's states from process 0 in
# flat buckets of at most this many bytes (DistributedDataParallel.broadcast_bucket_size).
DDP_BROADCAST_BUCKET = 250 * 1024 * 1024
# DeepSpeed ZeRO-3's defaults (DeepSpeedZeroConfig); recipes/accelerate/deepspeed-zero3.yaml sets
# neither, and Accelerate fills them from hidden_size only when a config file says "auto".
ZERO3_REDUCE_BUCKET = 500_000_000  # elements of the gradient bucket, allocated whole at initialize
ZERO3_MAX_LIVE = 1_000_000_000  # elements gathered at once (kept between forward and backward)


@dataclass(frozen=True)
class Shape:
    """The widths the activation estimate needs, read from any supported MoE config."""

    hidden: int
    layers: int
    dense_layers: int  # leading dense-MLP layers (first_k_dense_replace)
    q_width: int  # heads x head_dim
    kv_width: int  # kv heads x head_dim
    experts: int
    top_k: int
    expert_width: int
    shared_width: int  # the shared experts' intermediate width (0: none)
    dense_width: int
    vocab: int

    @classmethod
    def of(cls, config: Any) -> Shape:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        experts = (
            getattr(text, "num_experts", None)
            or getattr(text, "n_routed_experts", None)
            or getattr(text, "num_local_experts", None)
            or 1
        )
        expert_width = getattr(text, "moe_intermediate_size", None) or text.intermediate_size
        shared = getattr(text, "num_shared_experts", None) or getattr(text, "n_shared_experts", None) or 0
        return cls(
            hidden=text.hidden_size,
            layers=text.num_hidden_layers,
            dense_layers=getattr(text, "first_k_dense_replace", 0) or 0,
            q_width=heads * head_dim,
            kv_width=(getattr(text, "num_key_value_heads", None) or heads) * head_dim,
            experts=experts,
            top_k=getattr(text, "num_experts_per_tok", 1) or 1,
            expert_width=expert_width,
            shared_width=shared * expert_width,
            dense_width=text.intermediate_size,
            vocab=text.vocab_size,
        )


def lora_state_bytes(trainable: int, strategy: str, gpus: int) -> float:
    """LoRA weights, gradients and AdamW moments (fp32) per process; FSDP and ZeRO-3 partition them."""
    return trainable * LORA_BYTES / (gpus if strategy in ("fsdp", "zero3") else 1)


def engine_buffer_bytes(trainable: int, strategy: str, gpus: int, device: str) -> float:
    """What the engine allocates for the gradient exchange, per process.

    DDP: a bucket copy of every LoRA gradient. ZeRO-3: the reduce bucket, `ZERO3_REDUCE_BUCKET`
    gradient elements (fp32: the LoRA gradients' dtype) allocated whole on a GPU; a CPU process makes
    resident only the part written, the LoRA gradients when they are fewer (`device="cpu"`).
    FSDP2 reduce-scatters each unit's gradients as they come (no standing buffer).
    """
    if strategy == "ddp":
        return trainable * 4.0 if gpus > 1 else 0.0  # one process trains without DDP
    if strategy == "zero3":
        elements = min(trainable, ZERO3_REDUCE_BUCKET) if device == "cpu" else ZERO3_REDUCE_BUCKET
        return elements * 4.0
    return 0.0


def partitioned_parameters(model: nn.Module, quantized: bool) -> Iterator[tuple[str, nn.Parameter]]:
    """The parameters FSDP / ZeRO-3 partition: all but quantized routed experts (buffers, kept whole)."""
    from finetune.quantization.experts import WEIGHT_NAMES, quantizable

    whole = set()
    if quantized:
        for module_name, module in model.named_modules():
            if quantizable(module):
                whole |= {
                    f"{module_name}.{n}"
                    for n, p in module.named_parameters(recurse=False)
                    if n in WEIGHT_NAMES
                }
    for name, param in model.named_parameters():
        if name not in whole:
            yield name, param


def gathered_bytes(model: nn.Module, strategy: str, bytes_per: int, quantized: bool) -> float:
    """Whole parameters an FSDP / ZeRO-3 process holds at once besides its partition, at most.

    FSDP2 (one unit per decoder layer, `_no_split_modules`): the unit running and the next one it
    prefetches, plus the root unit (embeddings, final norm, lm_head), which FSDP2 keeps whole from
    forward to backward. ZeRO-3 with DeepSpeed's defaults: after its first step (which traces the
    module order) a parameter used again within 1e9 elements stays gathered from forward to
    backward, and at most `ZERO3_MAX_LIVE` elements are live: a base under that is gathered whole.
    LoRA weights (the trainable parameters, fp32) are gathered with their modules. `model` carries
    its LoRA; `quantized`: its routed experts are stored quantized (whole already, never gathered).
    """
    if strategy == "ddp":
        return 0.0
    if strategy == "zero3":
        params = [p for _, p in partitioned_parameters(model, quantized)]
        frozen_live = min(sum(p.numel() for p in params if not p.requires_grad), ZERO3_MAX_LIVE)
        lora_live = min(sum(p.numel() for p in params if p.requires_grad), ZERO3_MAX_LIVE - frozen_live)
        return frozen_live * bytes_per + lora_live * 4.0
    unit_names = set(getattr(model, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in unit_names]

    def size(params: Iterator[tuple[str, nn.Parameter]]) -> float:
        return sum(p.numel() * (4 if p.requires_grad else bytes_per) for _, p in params)

    in_units = {id(p) for m in units for p in m.parameters()}
    root = size((n, p) for n, p in partitioned_parameters(model, quantized) if id(p) not in in_units)
    largest = max((size(partitioned_parameters(m, quantized)) for m in units), default=0.0)
    return min(root + 2 * largest, size(partitioned_parameters(model, quantized)))


def activation_bytes(
    config: Any, batch_size: int, seq_len: int, bytes_per: int, r: int, checkpointing: bool
) -> float:
    """Activations kept for backward, per process, for LoRA on attention and routed experts.

    Per token of a MoE layer: the two norm inputs and the normed input the LoRA A factors read (3H),
    what attention keeps (q, k, v and its output: 2 q-width + 2 kv-width) and the LoRA B inputs (4r),
    the router's probabilities (E), and moetune's routed path: the layer input (H) and per routed
    pair the up projection's output (2I) and the two thin LoRA activations (2r) (adapters/experts.py);
    shared experts keep 3 widths. Per MoE layer, not per token: the routed path's copy of the expert
    LoRA B factors (E x (2I + H) x r, fp32). Outside the layers: the embedding output and the final
    norm's input (2H). With checkpointing only each layer's input is kept, plus one layer recomputed.
    """
    s = Shape.of(config)
    tokens = batch_size * seq_len
    attention = 3 * s.hidden + 2 * s.q_width + 2 * s.kv_width + 4 * r
    moe = attention + s.experts + s.hidden + s.top_k * (2 * s.expert_width + 2 * r) + 3 * s.shared_width
    dense = attention + 3 * s.dense_width
    moe_layers = s.layers - s.dense_layers
    lora_copies = s.experts * (2 * s.expert_width + s.hidden) * r * 4.0  # bytes per MoE layer
    per_layer = [tokens * moe * bytes_per + lora_copies] * moe_layers + [
        tokens * dense * bytes_per
    ] * s.dense_layers
    outside = tokens * 2 * s.hidden * bytes_per
    if checkpointing:
        return tokens * s.hidden * bytes_per * s.layers + max(per_layer, default=0.0) + outside
    return sum(per_layer) + outside


def logits_bytes(config: Any, batch_size: int, seq_len: int, bytes_per: int, lora_on_head: bool) -> float:
    """The output layer's logits and the loss on them, at the peak of backward, per process.

    The logits (V per token in the dtype), the log-softmax the loss keeps (fp32: transformers' loss
    upcasts) and its gradient in backward (fp32); LoRA on lm_head adds the base and LoRA outputs
    summed into the logits (one more logits-sized tensor).
    """
    per_token = bytes_per * (2 if lora_on_head else 1) + 4 + 4
    return batch_size * seq_len * Shape.of(config).vocab * per_token


def load_peak_bytes(
    weight_bytes: float, partitioned_bytes: float, trainable: int, strategy: str, gpus: int
) -> float:
    """Memory of a process while the model is loaded and handed to the engine (before the steps).

    Every process builds the whole base and its LoRA; then DDP broadcasts the states from process 0
    in flat buckets (`DDP_BROADCAST_BUCKET`), Accelerate's FSDP2 copies the whole state dict and
    loads it into the sharded model (one more base), and ZeRO-3 partitions module by module, then
    initialises AdamW through a zero gradient buffer of all LoRA parameters and keeps flat partitions
    of the LoRA weights and gradients.
    """
    whole = weight_bytes + trainable * 4.0
    if strategy == "ddp":
        if gpus == 1:
            return whole
        return whole + min(partitioned_bytes + trainable * 4.0, DDP_BROADCAST_BUCKET)
    if strategy == "fsdp":
        return whole + partitioned_bytes + trainable * 4.0
    return whole + trainable * 4.0 + trainable * 8.0 / gpus
