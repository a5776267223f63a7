"""`moetune generate`: a continuation of a prompt from a MODEL, optionally with an adapter and media.

The prompt is laid out the way the model (or the adapter) expects it, as recipe tools do when they
chat with what they trained (LLaMA-Factory and torchtune use the training template at inference):
- `chat=True`: one user message rendered with the chat template (the adapter's recipe's
  `data.chat_template` when it was trained on chat data, else the tokenizer's), generation prompt added;
- `chat=False`: the prompt text as it is (with the tokenizer's own special tokens, e.g. BOS);
- `chat=None` (default): the layout the adapter was trained with when its folder has the recipe
  (`data.format: chat` -> chat, `instruction` -> prompt + `data.separator`, `text` -> as it is);
  otherwise the chat template when the tokenizer has one, else the text as it is.
Multimodal models always use their training layout (BOS + prompt after the media prefix).

Decoding is greedy unless `temperature > 0` (then sampling, with `top_p`; `seed` makes it repeatable
without touching the caller's random state). The new text is decoded from the whole sequence, so a
character split across tokens is never cut in two; an incomplete character at the end (the token
budget ran out inside it) is dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from finetune.errors import MoetuneError
from finetune.loading import load_model

REPLACEMENT = "\ufffd"  # what a byte-level decoder yields for bytes that form no character


def _adapter_recipe(adapter: str | None) -> dict[str, Any]:
    """The `data` section of the recipe saved next to an adapter ({} when there is none)."""
    import yaml

    path = Path(adapter) / "recipe.yaml" if adapter else None
    if path is None or not path.is_file():
        return {}
    try:
        recipe = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    data = recipe.get("data") if isinstance(recipe, dict) else None
    return data if isinstance(data, dict) else {}


def _chat_template(tokenizer: Any, data: dict[str, Any]) -> str | None:
    """The template an adapter trained on chat data used (its recipe's), else the tokenizer's own."""
    setting = data.get("chat_template") if data.get("format") == "chat" else None
    if setting == "simple":
        from finetune.data.formats import simple_chat_template

        return simple_chat_template()
    return setting or getattr(tokenizer, "chat_template", None)


def prompt_inputs(
    tokenizer: Any, prompt: str, *, chat: bool | None = None, adapter: str | None = None
) -> dict[str, Any]:
    """input_ids / attention_mask of `prompt` for a text model, laid out as the module docstring says."""
    data = _adapter_recipe(adapter)
    template = _chat_template(tokenizer, data)
    trained = data.get("format")
    if chat is None:
        chat = trained == "chat" or (trained is None and bool(template))
        if trained == "instruction":
            prompt += data.get("separator", "\n")
    if chat:
        if not template:
            raise MoetuneError(
                "--chat: the tokenizer has no chat template; pass --raw to use the prompt as it is"
            )
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            chat_template=template,
            add_generation_prompt=True,
            return_dict=True,
            return_tensors="pt",
        )
        return {k: rendered[k] for k in ("input_ids", "attention_mask") if k in rendered}
    inputs = dict(tokenizer(prompt, return_tensors="pt"))
    if inputs["input_ids"].shape[1] == 0:
        raise MoetuneError("--prompt is empty and the tokenizer adds no BOS token; give a prompt")
    return inputs


def decode_new_text(tokenizer: Any, sequence: list[int], prompt_length: int) -> str:
    """The text after the prompt, decoded from the whole sequence (characters are never cut in two).

    The new ids are decoded together with the prompt, then the decoded prompt is removed: a character
    whose bytes span several tokens, even one begun by the prompt's last token, comes out whole
    (decoding per token, or the new ids alone, would show U+FFFD halves). A trailing incomplete
    character (the token budget ended inside it) is dropped rather than shown as U+FFFD.
    """
    whole = tokenizer.decode(sequence, skip_special_tokens=True)
    prompt = tokenizer.decode(sequence[:prompt_length], skip_special_tokens=True).rstrip(REPLACEMENT)
    if whole.startswith(prompt):
        new = whole[len(prompt) :]
    else:  # a tokenizer whose decoding is not prefix-stable: decode the new ids alone
        new = tokenizer.decode(sequence[prompt_length:], skip_special_tokens=True)
    return new.rstrip(REPLACEMENT)


def _sampling(temperature: float, top_p: float) -> dict[str, Any]:
    if temperature < 0:
        raise MoetuneError(f"--temperature must be >= 0 (0 = greedy); got {temperature}")
    if not 0 < top_p <= 1:
        raise MoetuneError(f"--top-p must be in (0, 1]; got {top_p}")
    if temperature == 0:
        if top_p != 1:
            raise MoetuneError("--top-p applies to sampling only; add --temperature > 0 (e.g. 0.7)")
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p}


def generate_text(
    spec: str,
    prompt: str,
    *,
    max_new_tokens: int = 32,
    adapter: str | None = None,
    image: str | None = None,
    audio: str | None = None,
    chat: bool | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    quantize: str | None = None,
) -> str:
    """A continuation of `prompt` (the new text only), with the KV cache; see the module docstring.

    `quantize` loads the routed experts int8 / nf4 (an adapter trained on a quantized base applies
    to the float base too, and the other way round)."""
    if max_new_tokens < 1:
        raise MoetuneError(f"--max-new-tokens must be >= 1 (got {max_new_tokens})")
    settings = _sampling(temperature, top_p)
    model, tokenizer = load_model(
        spec, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, quantize=quantize
    )
    if tokenizer is None:
        raise MoetuneError(f"{spec!r} has no tokenizer files; save one with the model to generate text")
    if adapter is not None:
        from adapters import load_adapter

        model = load_adapter(model, adapter, base=str(spec))
    model.eval()
    text_tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if hasattr(tokenizer, "prompt_ids"):  # a multimodal processor: its training layout
        if chat:
            raise MoetuneError(
                "--chat: multimodal models are prompted in their training layout (BOS + prompt after the "
                "media); drop --chat"
            )
        from finetune.data.multimodal import prepare_multimodal_inputs

        inputs = prepare_multimodal_inputs(tokenizer, prompt, image=image, audio=audio)
    else:
        if image is not None or audio is not None:
            raise MoetuneError(
                f"--image / --audio given but {spec} is a text-only model; use a multimodal model folder "
                "(`moetune init-model --preset tiny --modalities image,audio`)"
            )
        inputs = prompt_inputs(text_tokenizer, prompt, chat=chat, adapter=adapter)
    prompt_length = inputs["input_ids"].shape[1]
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            pad_token_id=text_tokenizer.pad_token_id,
            **settings,
        )
    return decode_new_text(text_tokenizer, output[0].tolist(), prompt_length)
