"""Multimodal data generated at run time: shapes images, tones / chords audio, MM-IMDB-style records.

Everything is deterministic in (kind, n, seed) and written as real files (PNG, WAV / FLAC) plus a
`records.jsonl` in the multimodal record format (absolute media paths), so the recipes and the evidence
read it back through the same loader as user data. A recipe names it as a data source
`synthetic:KIND[:N[:SEED]]` (`materialize`); data.eval defaults to another seed than data.train, so
held-out examples are new draws. Kinds:

- `shapes-caption`: a coloured shape at one of nine positions on a 64 x 64 canvas; target caption
  "a red circle at the top left". 4 colours x 3 shapes x 9 positions = 108 captions.
- `shapes-align`: the same images with the caption as `text` (image-text pairs for contrastive training);
  the caption is unique within each generated set as long as n <= 108.
- `tones`: a single note or its major triad (sine partials, random loudness, 0.8-1.2 s, a little
  noise) written at 22.05 kHz or 8 kHz (WAV / FLAC), so loading must resample to the encoder's rate;
  target "a single C tone" / "a C major chord". 4 notes x 2 kinds = 8 descriptions.
- `mmimdb`: a plot text + a poster image + multi-labels (genres). Four genres are told only by the plot's
  wording, four only by the poster (shape and colour), so text + image beats either alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from finetune.data.synthetic_spec import parse_synthetic_spec

GENERATOR_VERSION = 3

COLOURS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 90, 200), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
# (row, column) on a 3 x 3 grid -> words in the caption; laid out as the grid, row by row (fmt: skip)
POSITIONS = {
    (0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
    (1, 0): "on the left", (1, 1): "in the centre", (1, 2): "on the right",
    (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right",
}  # fmt: skip
NOTES = {"C": 261.63, "E": 329.63, "G": 392.00, "A": 440.00}
TONE_KINDS = ("tone", "chord")

TEXT_GENRES = {
    "crime": ["a detective", "a robbery", "the police", "a stolen diamond"],
    "romance": ["two lovers", "a wedding", "a first kiss", "a broken heart"],
    "comedy": ["a clumsy waiter", "a silly prank", "a talking parrot", "a pie fight"],
    "war": ["a battlefield", "soldiers", "a general", "the front line"],
}
FILLER = ["in a small town", "one winter", "after many years", "far from home", "at night", "by the sea"]
IMAGE_GENRES = {  # genre -> (colour, shape) drawn on the poster
    "horror": ("red", "triangle"),
    "sci-fi": ("blue", "circle"),
    "western": ("yellow", "square"),
    "animation": ("green", "circle"),
}
MMIMDB_LABELS = sorted([*TEXT_GENRES, *IMAGE_GENRES])

KINDS = ("shapes-caption", "shapes-align", "tones", "mmimdb")


def shape_caption(colour: str, shape: str, cell: tuple[int, int]) -> str:
    return f"a {colour} {shape} {POSITIONS[cell]}"


def draw_shape(
    rng: np.random.Generator, colour: str, shape: str, cell: tuple[int, int] | None, size: int = 64
):
    """A PIL image: a plain light background (its shade varies a little), one filled shape in `cell` of
    a 3 x 3 grid (or anywhere)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(225, 256, size=3)))
    draw = ImageDraw.Draw(image)
    cell_size = size / 3
    radius = rng.uniform(0.38, 0.46) * cell_size
    if cell is None:
        cx, cy = rng.uniform(radius, size - radius, size=2)
    else:
        cy = (cell[0] + 0.5) * cell_size + rng.uniform(-0.1, 0.1) * cell_size
        cx = (cell[1] + 0.5) * cell_size + rng.uniform(-0.1, 0.1) * cell_size
    fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLOURS[colour])
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    return image


def tone_waveform(rng: np.random.Generator, note: str, kind: str, sampling_rate: int) -> np.ndarray:
    """A single sine note, or its major triad (root, +4, +7 semitones), with an envelope and noise."""
    seconds = rng.uniform(0.8, 1.2)
    t = np.arange(int(seconds * sampling_rate)) / sampling_rate
    root = NOTES[note]
    freqs = [root] if kind == "tone" else [root, root * 2 ** (4 / 12), root * 2 ** (7 / 12)]
    wave = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) for f in freqs) / len(freqs)
    envelope = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.02)  # 20 ms fade in / out
    wave = rng.uniform(0.3, 0.8) * envelope * wave + rng.normal(0, 0.01, size=t.shape)
    return wave.astype(np.float32)


def tone_description(note: str, kind: str) -> str:
    return f"a single {note} tone" if kind == "tone" else f"a {note} major chord"


def _plot_text(rng: np.random.Generator, genres: list[str]) -> str:
    phrases = [str(rng.choice(TEXT_GENRES[g])) for g in genres]
    filler = str(rng.choice(FILLER))
    return f"a story about {' and '.join(phrases)} {filler}"


def _records(kind: str, n: int, seed: int, folder: Path) -> list[dict[str, Any]]:
    import soundfile as sf

    rng = np.random.default_rng(seed)
    records: list[dict[str, Any]] = []
    media = folder / "media"
    media.mkdir(parents=True, exist_ok=True)
    if kind in ("shapes-caption", "shapes-align"):
        combos = [(c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS]
        if kind == "shapes-align" and n <= len(combos):
            order = rng.permutation(len(combos))[:n]  # distinct captions: retrieval has one right answer
            chosen = [combos[i] for i in order]
        else:
            chosen = [combos[i] for i in rng.integers(0, len(combos), size=n)]
        for i, (colour, shape, cell) in enumerate(chosen):
            name = str(folder / f"media/{i:05d}.png")
            draw_shape(rng, colour, shape, cell).save(name)
            caption = shape_caption(colour, shape, cell)
            records.append(
                {"image": name, "target": caption}
                if kind == "shapes-caption"
                else {"image": name, "text": caption}
            )
    elif kind == "tones":
        for i in range(n):
            note, tone_kind = str(rng.choice(list(NOTES))), str(rng.choice(TONE_KINDS))
            sampling_rate, ext = [(22050, "wav"), (8000, "flac")][i % 2]
            name = str(folder / f"media/{i:05d}.{ext}")
            sf.write(name, tone_waveform(rng, note, tone_kind, sampling_rate), sampling_rate)
            records.append({"audio": name, "target": tone_description(note, tone_kind)})
    elif kind == "mmimdb":
        for i in range(n):
            text_genres = sorted(rng.choice(list(TEXT_GENRES), size=int(rng.integers(1, 3)), replace=False))
            image_genre = str(rng.choice(list(IMAGE_GENRES)))
            colour, shape = IMAGE_GENRES[image_genre]
            cell = (int(rng.integers(0, 3)), int(rng.integers(0, 3)))
            name = str(folder / f"media/{i:05d}.png")
            draw_shape(rng, colour, shape, cell).save(name)
            records.append(
                {
                    "image": name,
                    "text": _plot_text(rng, list(text_genres)),
                    "labels": sorted([*map(str, text_genres), image_genre]),
                }
            )
    else:
        raise ValueError(f"unknown synthetic kind {kind!r}; one of {KINDS}")
    return records


def generate(kind: str, n: int, seed: int, folder: str | os.PathLike) -> Path:
    """Write `n` records of `kind` (media files + records.jsonl) into `folder`; returns the jsonl path.

    Reuses a complete earlier generation with the same (kind, n, seed, version) in that folder.
    """
    folder = Path(folder).resolve()
    records_file = folder / "records.jsonl"
    stamp = folder / "COMPLETE"
    wanted = json.dumps({"kind": kind, "n": n, "seed": seed, "version": GENERATOR_VERSION})
    if stamp.is_file() and stamp.read_text() == wanted and records_file.is_file():
        return records_file
    folder.mkdir(parents=True, exist_ok=True)
    records = _records(kind, n, seed, folder)
    tmp = records_file.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(records_file)
    stamp.write_text(wanted)
    return records_file


def default_cache_dir() -> Path:
    root = os.environ.get("MOETUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "moetune"
    )
    return Path(root) / "synthetic"


DEFAULT_SIZES = {"train": 1000, "eval": 200}
DEFAULT_SEEDS = {"train": 0, "eval": 1}


def parse_spec(spec: str) -> tuple[str, int | None, int | None]:
    """`synthetic:KIND[:N[:SEED]]` -> (KIND, N or None, SEED or None) for this module's KINDS."""
    return parse_synthetic_spec(spec, KINDS)


def materialize(spec: str, *, what: str = "data.train", cache_dir: str | os.PathLike | None = None) -> Path:
    """Generate (or reuse) the data of a `synthetic:KIND[:N[:SEED]]` source; returns its records.jsonl.

    `what` is the recipe key (data.train / data.eval): it picks the default size and seed, so a
    held-out set is drawn with another seed than the training set.
    """
    kind, n, seed = parse_spec(spec)
    split = "eval" if what.endswith("eval") else "train"
    n = n if n is not None else DEFAULT_SIZES[split]
    seed = seed if seed is not None else DEFAULT_SEEDS[split]
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    return generate(kind, n, seed, root / f"{kind}-n{n}-seed{seed}-v{GENERATOR_VERSION}")


def corpus() -> list[str]:
    """Every sentence the generators can produce (captions, descriptions, plot phrases)."""
    texts = [shape_caption(c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS]
    texts += [tone_description(n, k) for n in NOTES for k in TONE_KINDS]
    texts += [f"a story about {p} {f}" for phrases in TEXT_GENRES.values() for p in phrases for f in FILLER]
    return texts


def synthetic_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained on `corpus()` with <pad>=0, <s>=1, </s>=2 (the presets' ids).

    For tests and the evidence script when no model folder with its own tokenizer is at hand.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus() * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
