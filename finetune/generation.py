"""`moetune generate`: greedy decoding from a MODEL, optionally with an adapter and media inputs."""

from __future__ import annotations

import torch

from finetune.errors import MoetuneError
from finetune.loading import load_model


def generate_text(
    spec: str,
    prompt: str,
    *,
    max_new_tokens: int = 32,
    adapter: str | None = None,
    image: str | None = None,
    audio: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    quantize: str | None = None,
) -> str:
    """Greedy continuation of `prompt` (the new text only), using the KV cache.

    `quantize` loads the routed experts int8 / nf4 (an adapter trained on a quantized base applies
    to the float base too, and the other way round)."""
    if max_new_tokens < 1:
        raise MoetuneError(f"--max-new-tokens must be >= 1 (got {max_new_tokens})")
    model, tokenizer = load_model(
        spec, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, quantize=quantize
    )
    if tokenizer is None:
        raise MoetuneError(f"{spec!r} has no tokenizer files; save one with the model to generate text")
    if adapter is not None:
        from adapters import load_adapter

        model = load_adapter(model, adapter)
    model.eval()
    if image is not None or audio is not None:
        from finetune.data.multimodal import prepare_multimodal_inputs

        inputs = prepare_multimodal_inputs(tokenizer, prompt, image=image, audio=audio)
        text_tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    else:
        text_tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        inputs = text_tokenizer(prompt, return_tensors="pt")
    prompt_length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=text_tokenizer.pad_token_id,
        )
    return text_tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True)
