"""MODEL spec -> (model, tokenizer/processor): presets, local folders, hub ids; offline-safe.

A MODEL spec is `preset:NAME` (the built-in architecture, random init, with the offline tokenizer),
a local Hugging Face folder, or a hub id. Nothing downloads unless the user gave a hub id, and a
hub id with no network fails fast with one line instead of hanging in retries.
Weights load from safetensors only, unless `allow_pickle=True`; remote code runs only when
`trust_remote_code=True`.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from adapters.output_folder import atomic_output_folder
from finetune.errors import MoetuneError
from finetune.modeling import PRESETS, preset_config
from finetune.modeling.presets import META_ONLY_ON_CPU

PRESET_PREFIX = "preset:"
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")
# `preset:NAME` is one model wherever it is loaded (train, experts profile, generate, info): its
# weights are drawn with this seed, the same as `init-model --preset NAME` with its default --seed.
PRESET_SEED = 0


@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Random initialisation that depends on `seed` alone and leaves the caller's RNG as it was.

    Only the CPU generator is seeded (models are built on the CPU, then moved); `fork_rng` restores
    its state afterwards, so a training run's own seed decides what happens next (LoRA init, data).
    """
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16; 'auto' and None pass through."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in DTYPES:
        raise MoetuneError(f"unknown dtype {dtype!r}; use one of auto, float32, bfloat16, float16")
    return DTYPES[dtype]


def _preset_name(spec: str) -> str:
    name = spec[len(PRESET_PREFIX) :]
    if name not in PRESETS:
        raise MoetuneError(f"unknown preset {name!r} in MODEL {spec!r}; choose one of {', '.join(PRESETS)}")
    return name


def _looks_like_hub_id(spec: str) -> bool:
    """owner/name, unless it is a path (starts like one, or its first part is a local folder: runs/x)."""
    parts = spec.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not spec.startswith((".", "/", "~"))
        and not Path(parts[0]).is_dir()
        and re.fullmatch(r"[\w.-]+/[\w.-]+", spec) is not None
    )


def check_model_folder(folder: Path, *, allow_pickle: bool = False) -> None:
    """Refuse folders that are not models, or whose weights are pickle files (unless allowed)."""
    if not folder.is_dir():
        raise MoetuneError(
            f"model folder {str(folder)!r} does not exist; pass a folder, preset:NAME or a hub id"
        )
    if not (folder / "config.json").exists():
        raise MoetuneError(
            f"{str(folder)!r} is not a model folder (no config.json); pass a folder written by "
            "save_pretrained or `moetune init-model`"
        )
    has_safetensors = any(folder.glob("*.safetensors"))
    pickles = [name for name in PICKLE_WEIGHTS if (folder / name).exists()]
    if pickles and not has_safetensors and not allow_pickle:
        raise MoetuneError(
            f"{folder / pickles[0]} holds pickle weights, which can run code when loaded; convert them to "
            "safetensors, or pass --allow-pickle (model.allow_pickle: true) if you trust the file"
        )


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def download_from_hub(repo_id: str) -> Path:
    """Fetch a hub model snapshot (config, safetensors, tokenizer files); fail fast when offline."""
    from huggingface_hub import snapshot_download

    try:  # already in the local cache: no network needed
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any cache miss means we need the network
        pass
    if not _hub_reachable():
        raise MoetuneError(
            f"model folder {repo_id!r} does not exist here, and moetune cannot reach the Hugging Face Hub to "
            "download it as a hub id (offline or HF_HUB_OFFLINE=1); pass an existing folder or preset:NAME, "
            "or download it where there is network"
        )
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as err:  # noqa: BLE001 - repository missing, gated, or network broke mid-way
        raise MoetuneError(
            f"model folder {repo_id!r} does not exist here, and downloading it as a hub id failed: "
            f"{type(err).__name__}: {err}"
        ) from err


def resolve_model_folder(spec: str, *, allow_pickle: bool = False) -> Path:
    """A MODEL spec that names weights on disk -> that folder (downloading a hub id if needed)."""
    spec = str(spec)
    if spec.startswith(PRESET_PREFIX):
        name = _preset_name(spec)
        raise MoetuneError(
            f"{spec!r} has no weights on disk; write them first with "
            f"`moetune init-model --preset {name} --output DIR` and pass DIR"
        )
    folder = Path(spec).expanduser()
    if folder.exists() or not _looks_like_hub_id(spec):
        check_model_folder(folder, allow_pickle=allow_pickle)
        return folder
    return download_from_hub(spec)


def load_config(spec: str, *, trust_remote_code: bool = False) -> PretrainedConfig:
    """Only the config of a MODEL spec (cheap: no weights)."""
    spec = str(spec)
    if spec.startswith(PRESET_PREFIX):
        return preset_config(_preset_name(spec))
    folder = resolve_model_folder(spec)
    return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)


def build_empty_model(config: PretrainedConfig, *, trust_remote_code: bool = False) -> PreTrainedModel:
    """The model of `config` on the meta device: shapes and names, no memory (for info and planning)."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def load_tokenizer(folder: Path, *, trust_remote_code: bool = False) -> Any:
    """The processor (multimodal) or tokenizer saved with a model; None when the folder has neither."""
    if (folder / "processor_config.json").exists() or (folder / "preprocessor_config.json").exists():
        from transformers import AutoProcessor

        try:
            return AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # fall back to the plain tokenizer below
    if any(
        (folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    return None


def load_model(
    spec: str,
    *,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    modalities: list[str] | None = None,
    quantize: str | None = None,
) -> tuple[PreTrainedModel, Any]:
    """MODEL spec -> (model, tokenizer or processor).

    `preset:NAME` builds the built-in architecture with random weights drawn with PRESET_SEED (the
    same weights on every load, whatever the caller's RNG, which is left untouched) and the offline
    tokenizer (with `modalities`, the multimodal model and its processor); `preset:full` is refused on a
    CPU-only machine (it is ~19B parameters: use `moetune info`). A folder's own config decides its
    modalities, so asking for others there is refused rather than silently ignored.
    """
    spec = str(spec)
    torch_dtype = parse_dtype(dtype)
    quantize = check_quantize(quantize)
    if spec.startswith(PRESET_PREFIX):
        name = _preset_name(spec)
        if name in META_ONLY_ON_CPU and not torch.cuda.is_available():
            raise MoetuneError(
                f"{spec!r} is too large to materialise on a CPU; inspect it with `moetune info {spec}` "
                "or load it on GPUs"
            )
        from finetune.tokenizer import build_tokenizer

        config = _preset_or_multimodal_config(name, modalities)
        with seeded_init(PRESET_SEED):
            model = AutoModelForCausalLM.from_config(
                config, dtype=torch_dtype if isinstance(torch_dtype, torch.dtype) else None
            )
        if quantize:
            from finetune.quantization import quantize_model_experts_

            quantize_model_experts_(model, quantize)
        if device_map not in (None, "cpu"):
            model = model.to("cuda" if device_map == "auto" else device_map)
        tokenizer = build_tokenizer(config.vocab_size)
        model.name_or_path = spec  # what PEFT records as the adapter's base_model_name_or_path
        if modalities:
            from finetune.modeling.multimodal import build_processor

            return model, build_processor(config, tokenizer)
        return model, tokenizer

    folder = resolve_model_folder(spec, allow_pickle=allow_pickle)
    if modalities:
        saved = list(getattr(AutoConfig.from_pretrained(folder), "modalities", None) or [])
        if sorted(saved) != sorted(modalities):
            raise MoetuneError(
                f"{folder} was saved with modalities {saved or 'none'} but {list(modalities)} were asked for; "
                "drop model.modalities for a saved model, or init a model with those modalities"
            )
    try:
        saved_config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        method = _quantization_to_load(folder, saved_config, quantize)
        if method is not None:
            from finetune.quantization.loading import load_with_quantized_experts

            model = load_with_quantized_experts(
                folder,
                saved_config,
                None if _is_quantized_folder(saved_config) else method,
                dtype=torch_dtype,
                device_map=device_map,
                trust_remote_code=trust_remote_code,
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(
                folder,
                dtype=torch_dtype if torch_dtype is not None else "auto",
                device_map=device_map,
                trust_remote_code=trust_remote_code,
                use_safetensors=None if allow_pickle else True,
            )
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise MoetuneError(
                f"{folder} needs custom code from the model repository; review it, then pass "
                "--trust-remote-code (model.trust_remote_code: true)"
            ) from err
        raise
    # The adapter's recorded base (PEFT's base_model_name_or_path): the hub id, or the folder's absolute path.
    model.name_or_path = str(folder.resolve()) if Path(spec).expanduser().exists() else spec
    return model, load_tokenizer(folder, trust_remote_code=trust_remote_code)


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute activations in backward (non-reentrant, so LoRA's frozen inputs need no grad); no KV cache."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def check_quantize(quantize: str | None) -> str | None:
    """None, "int8" or "nf4"; anything else is a one-line error."""
    from finetune.quantization.formats import METHODS

    if quantize in (None, "none", "null"):
        return None
    if quantize not in METHODS:
        raise MoetuneError(
            f"model.quantize / --quantize: unknown method {quantize!r}; use {' or '.join(METHODS)} (or leave it out)"
        )
    return quantize


def _is_quantized_folder(config: PretrainedConfig) -> bool:
    from finetune.quantization.loading import quantization_of

    return quantization_of(config)[1] is not None


def _quantization_to_load(folder: Path, config: PretrainedConfig, quantize: str | None) -> str | None:
    """The method the experts load with; refuses folders quantized another way or with another method."""
    from finetune.quantization.loading import quantization_of

    quant_method, saved = quantization_of(config)
    if quant_method is not None and saved is None:
        if quantize is None:
            return None  # someone else's quantized checkpoint (FP8, MXFP4, bnb): transformers loads it
        raise MoetuneError(
            f"{folder / 'config.json'}: the checkpoint is already quantized ({quant_method}); moetune quantizes "
            f"float (bf16 / fp32) checkpoints only: pass the original model, or leave out --quantize"
        )
    if saved is not None and quantize is not None and quantize != saved:
        raise MoetuneError(
            f"{folder}: its experts are stored as {saved}, but quantize={quantize!r} was asked for; "
            f"use quantize: {saved} (or leave it out), or quantize the float model again"
        )
    return saved or quantize


def _preset_or_multimodal_config(
    name: str, modalities: list[str] | None, **overrides: Any
) -> PretrainedConfig:
    try:
        if modalities:
            from finetune.modeling.multimodal import multimodal_config

            return multimodal_config(name, modalities, **overrides)
        return preset_config(name, **overrides)
    except ValueError as err:
        raise MoetuneError(f"preset {name!r}: {err}") from err


@dataclass
class WrittenModel:
    """A model folder `init-model` or `quantize` wrote; `str()` is the line the command prints."""

    folder: Path
    what: str  # e.g. "a random-initialised 'tiny' model and its tokenizer"

    def __str__(self) -> str:
        return f"wrote {self.what} to {self.folder}"


def init_model(
    preset: str,
    output: str | Path,
    *,
    attention: str | None = None,
    modalities: list[str] | None = None,
    seed: int = PRESET_SEED,
    quantize: str | None = None,
) -> WrittenModel:
    """Write a random-initialised built-in model of `preset` and its tokenizer to `output`.

    The weights depend on `seed` alone (the caller's RNG is neither used nor advanced); with the
    default seed and no other option they equal what `load_model("preset:NAME")` builds.
    With `quantize` ("int8" / "nf4") the model is written block by block with its routed experts
    quantized and never held in full precision (finetune.quantization.checkpoint): this is how the
    full preset (19.2B parameters) is created on a machine without GPUs. Its non-expert weights are
    bf16 for `full`, fp32 for the smaller presets (as without quantize).
    """
    name = _preset_name(PRESET_PREFIX + preset)
    quantize = check_quantize(quantize)
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise MoetuneError(
            f"output folder {str(output)!r} is not empty; choose a new folder (nothing was written)"
        )
    if name in META_ONLY_ON_CPU and not torch.cuda.is_available() and not quantize:
        raise MoetuneError(
            f"preset {name!r} is too large to initialise on a CPU; run init-model on a GPU machine, or write "
            f"it with quantized experts (--quantize nf4)"
        )
    overrides: dict[str, Any] = {}
    if attention is not None:
        overrides["attention_type"] = attention
    config = _preset_or_multimodal_config(name, modalities, **overrides)

    from finetune.tokenizer import build_tokenizer

    with atomic_output_folder(output) as tmp:  # a run stopped half-way leaves no finished-looking folder
        if quantize:
            from finetune.quantization.checkpoint import init_quantized_preset

            dtype = torch.bfloat16 if name in META_ONLY_ON_CPU else torch.float32
            init_quantized_preset(config, tmp, quantize, dtype=dtype, seed=seed)
        else:
            with seeded_init(seed):
                model = AutoModelForCausalLM.from_config(config)
            model.save_pretrained(tmp)
        tokenizer = build_tokenizer(config.vocab_size)
        if modalities:
            from finetune.modeling.multimodal import build_processor

            build_processor(config, tokenizer).save_pretrained(tmp)
        else:
            tokenizer.save_pretrained(tmp)
    experts = f" (routed experts {quantize})" if quantize else ""
    return WrittenModel(output, f"a random-initialised '{preset}' model{experts} and its tokenizer")


def quantize_model(
    spec: str,
    output: str | Path,
    method: str,
    *,
    dtype: str | None = None,
    max_shard_size: str | None = None,
    trust_remote_code: bool = False,
) -> WrittenModel:
    """Write MODEL to `output` with its routed experts quantized (`moetune quantize`).

    The float checkpoint is quantized while it loads, shard by shard; the output folder holds
    safetensors, config.json with `quantization_config`, and the tokenizer, and loads with
    `load_model(output)` or, after `import finetune`, `AutoModelForCausalLM.from_pretrained(output)`.
    """
    from finetune.quantization.checkpoint import save_quantized

    method = check_quantize(method)
    if method is None:
        raise MoetuneError("quantize: --method is required; use int8 or nf4")
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise MoetuneError(
            f"output folder {str(output)!r} is not empty; choose a new folder (nothing was written)"
        )
    if str(spec).startswith(PRESET_PREFIX) and _preset_name(str(spec)) in META_ONLY_ON_CPU:
        raise MoetuneError(
            f"{spec!r} has no weights to quantize; create it quantized with "
            f"`moetune init-model --preset {_preset_name(str(spec))} --quantize {method} --output DIR`"
        )
    with atomic_output_folder(output) as tmp:
        model, tokenizer = load_model(spec, quantize=method, dtype=dtype, trust_remote_code=trust_remote_code)
        save_quantized(model, tokenizer, tmp, max_shard_size=max_shard_size)
    return WrittenModel(output, f"{spec} with its routed experts stored {method}")
