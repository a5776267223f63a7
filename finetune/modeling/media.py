"""Reading images and audio for the multimodal model: decode, check, downmix, resample.

Kept beside the model (not in `finetune.data`) because the processor path used by `generate --image /
--audio` needs it too, and `finetune.modeling` imports nothing else from the project. A file that
cannot be used raises `MediaError` (a ValueError) whose message names the file and the reason.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


class MediaError(ValueError):
    """An image or audio file that cannot be used; the message says which and why."""


def resample(
    waveform: np.ndarray, orig_rate: int, new_rate: int, lowpass_width: int = 6, rolloff: float = 0.99
) -> np.ndarray:
    """Band-limited resampling of a 1-D waveform with a Hann-windowed sinc filter (polyphase, exact ratio).

    The ratio is reduced by the gcd; each of the `new` output phases is one FIR kernel applied with stride
    `orig`, cutting off at `rolloff` x the lower Nyquist frequency so nothing aliases.
    """
    if orig_rate == new_rate:
        return waveform.astype(np.float32, copy=False)
    g = math.gcd(int(orig_rate), int(new_rate))
    orig, new = int(orig_rate) // g, int(new_rate) // g
    cutoff = min(orig, new) * rolloff
    width = math.ceil(lowpass_width * orig / cutoff)
    offsets = torch.arange(-width, width + orig, dtype=torch.float64)[None, :] / orig  # (1, L)
    phases = -torch.arange(new, dtype=torch.float64)[:, None] / new  # (new, 1)
    t = ((phases + offsets) * cutoff).clamp(-lowpass_width, lowpass_width)  # (new, L), in cutoff periods
    window = torch.cos(t * math.pi / lowpass_width / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    kernels = (sinc * window * cutoff / orig).to(torch.float32).unsqueeze(1)  # (new, 1, L)
    x = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32))[None, None]  # (1, 1, n)
    x = torch.nn.functional.pad(x, (width, width + orig))
    y = torch.nn.functional.conv1d(x, kernels, stride=orig)  # (1, new, frames)
    y = y.transpose(1, 2).reshape(-1)  # interleave the phases
    out_len = math.ceil(new * waveform.shape[-1] / orig)
    return y[:out_len].numpy()


def load_image(path: Path, verify: str = "full"):
    """An RGB PIL image, or MediaError."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise MediaError(f"image {path} does not exist")
    try:
        with Image.open(path) as image:
            if verify == "header":
                image.verify()
                return None
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise MediaError(f"cannot read image {path} ({err})") from err


def load_audio(path: Path, sampling_rate: int, verify: str = "full") -> np.ndarray | None:
    """Mono float32 samples at `sampling_rate` (resampled from the file's rate), or MediaError."""
    import soundfile as sf

    if not path.is_file():
        raise MediaError(f"audio {path} does not exist")
    try:
        if verify == "header":
            info = sf.info(str(path))
            if info.frames == 0:
                raise MediaError(f"audio {path} has no samples")
            return None
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (frames, channels)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise MediaError(f"cannot read audio {path} ({err})") from err
    if data.shape[0] == 0:
        raise MediaError(f"audio {path} has no samples")
    wave = data.mean(axis=1)  # channels -> mono
    if not np.isfinite(wave).all():
        raise MediaError(f"audio {path} has non-finite samples")
    return resample(wave, rate, sampling_rate)
