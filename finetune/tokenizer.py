"""An offline tokenizer for the built-in presets: byte-level BPE trained on text already on the machine.

No tokenizer can be downloaded for a preset, so `init-model` trains one: a byte-level BPE (GPT-2 style,
every byte representable, so no text is ever out of vocabulary) on the Python standard library's
source files, which every Python install carries. Training is deterministic (sorted files, fixed
byte budget) and cached per vocabulary size. Saved as a `PreTrainedTokenizerFast`, so
`AutoTokenizer.from_pretrained(folder)` loads it with no moetune code.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from adapters.output_folder import atomic_output_folder
from finetune.errors import MoetuneError

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2: the presets' pad / bos / eos
TRAINING_BYTES = 3_000_000

# A minimal chat template so `chat` recipes work with the presets' tokenizer.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def stdlib_source_files() -> list[Path]:
    """The standard library's .py files, sorted (deterministic across runs)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__")
    return sorted(
        p for p in stdlib.rglob("*.py") if not any(part in skip for part in p.relative_to(stdlib).parts)
    )


def _training_text(budget: int = TRAINING_BYTES) -> Iterator[str]:
    used = 0
    for path in stdlib_source_files():
        if used >= budget:
            return
        text = path.read_text(encoding="utf-8", errors="replace")
        used += len(text)
        yield text


def _cache_dir() -> Path:
    base = os.environ.get("MOETUNE_CACHE") or Path.home() / ".cache" / "moetune"
    return Path(base) / "tokenizers"


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE with at most `vocab_size` tokens (specials first), trained once and cached."""
    files = stdlib_source_files()
    key = hashlib.sha256(f"{vocab_size}|{TRAINING_BYTES}|{len(files)}|v1".encode()).hexdigest()[:16]
    cached = _cache_dir() / f"bpe-{vocab_size}-{key}"
    if (cached / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(cached)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    try:  # a concurrent reader sees a whole, fsynced folder or none
        with atomic_output_folder(cached) as tmp:
            fast.save_pretrained(tmp)
    except MoetuneError:  # another process finished first: its folder is the same
        pass
    return AutoTokenizer.from_pretrained(cached)
