"""Keep transformers' and PEFT's own chatter out of a command that loads models it does not train.

Merging, verifying and exporting build or load whole models: transformers logs every missing or
unexpected key, draws a progress bar per file, and PEFT 0.21 reads transformers' deprecated
`is_gradient_checkpointing` (a FutureWarning of theirs). None of it is the user's business there;
moetune's own checks say what went wrong.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers / peft info logs, progress bars and warnings inside the block."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def one_line(err: BaseException, limit: int = 300) -> str:
    """An exception of transformers / peft as one short line, for a MoetuneError."""
    return " ".join(str(err).split())[:limit]
