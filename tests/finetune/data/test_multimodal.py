"""Multimodal data: records with any subset of modalities, media checks, resampling, synthetic sets, recipes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

import finetune  # noqa: F401
from finetune.data import synthetic_mm
from finetune.data.multimodal import (
    build_multimodal_data,
    build_multimodal_dataset,
    make_multimodal_collator,
    prepare_multimodal_inputs,
)
from finetune.errors import MoetuneError
from finetune.modeling.media import resample
from finetune.modeling.multimodal import build_processor, multimodal_config

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def processor():
    return build_processor(
        multimodal_config("tiny", ["image", "audio", "text"]), synthetic_mm.synthetic_tokenizer()
    )


def write_media(folder: Path) -> None:
    Image.fromarray(np.full((20, 30, 3), 120, dtype=np.uint8)).save(folder / "a.png")
    t = np.arange(4000) / 8000
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.zeros_like(t)], axis=1).astype(np.float32)
    sf.write(folder / "b.wav", stereo, 8000)  # 0.5 s, stereo, 8 kHz
    sf.write(folder / "c.flac", np.zeros(16000, dtype=np.float32), 16000)


RECORDS = [
    {"image": "a.png", "target": "a red circle"},
    {"audio": "b.wav", "target": "a single C tone", "text": "listen"},
    {"text": "a story about a detective", "labels": ["crime"]},
    {"image": "a.png", "text": "a story about two lovers", "labels": ["romance", "horror"]},
    {"audio": "c.flac", "image": "a.png"},
]


def write_jsonl(folder: Path, records: list[dict], name: str = "data.jsonl") -> Path:
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_records_with_any_subset_of_modalities_batch_together(tmp_path, processor):
    write_media(tmp_path)
    data = build_multimodal_data({"train": str(write_jsonl(tmp_path, RECORDS))}, processor)
    assert data.label_names == ["crime", "horror", "romance"] and data.eval is None
    examples = [data.train[i] for i in range(len(RECORDS))]
    batch = make_multimodal_collator({}, processor)(examples)
    assert batch["image_mask"].tolist() == [True, False, False, True, True]
    assert batch["audio_mask"].tolist() == [False, True, False, False, True]
    assert batch["text_mask"].tolist() == [False, True, True, True, False]
    assert batch["mm_label_mask"].tolist() == [False, False, True, True, False]
    assert batch["mm_labels"][3].tolist() == [0.0, 1.0, 1.0]
    assert batch["pixel_values"].shape == (5, 3, 64, 64)
    # 0.5 s at 8 kHz -> 8000 samples at 16 kHz; the 1 s FLAC sets the padded width
    assert batch["audio_attention_mask"][1].sum() == 8000 and batch["input_values"].shape == (5, 16000)
    tok = processor.tokenizer
    prompt = [tok.bos_token_id, *tok("listen", add_special_tokens=False)["input_ids"]]
    target = [*tok("a single C tone", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    length = len(prompt) + len(target)
    assert batch["input_ids"][1, :length].tolist() == prompt + target
    assert batch["labels"][1, :length].tolist() == [-100] * len(prompt) + target
    assert (batch["labels"][2] == -100).all()  # no target: nothing to learn in the decoder


def test_stereo_audio_is_downmixed_and_resampled_not_misread(tmp_path, processor):
    write_media(tmp_path)
    data = build_multimodal_data({"train": str(write_jsonl(tmp_path, [RECORDS[1]]))}, processor)
    wave = data.train[0]["audio"]
    t = np.arange(8000) / 16000
    expected = 0.5 * np.sin(2 * np.pi * 440 * t)  # mean of the two channels, at 16 kHz
    assert wave.shape == (8000,)
    assert np.abs(wave - expected)[200:-200].max() < 5e-3


def test_resample_is_accurate_and_band_limited():
    t = np.arange(22050) / 22050
    out = resample(np.sin(2 * np.pi * 1000 * t).astype(np.float32), 22050, 16000)
    assert out.shape == (16000,)
    ref = np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000)
    assert np.abs(out - ref)[100:-100].max() < 2e-3
    alias = resample(np.sin(2 * np.pi * 7000 * t).astype(np.float32), 22050, 8000)  # above 4 kHz Nyquist
    assert np.sqrt((alias[100:-100] ** 2).mean()) < 1e-3
    same = np.random.default_rng(0).normal(size=100).astype(np.float32)
    assert np.array_equal(resample(same, 16000, 16000), same)


def test_parquet_and_the_recipe_pipeline_form(tmp_path, processor):
    import datasets

    from finetune.recipe import DataSection

    write_media(tmp_path)
    rows = [{"picture": r.get("image"), "caption": r.get("target"), "text": r.get("text"),
             "labels": r.get("labels")} for r in RECORDS[:4]]  # fmt: skip
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "data.parquet"))
    section = DataSection(train=str(tmp_path / "data.parquet"), format="multimodal", image_field="picture",
                          target_field="caption")  # fmt: skip
    data = build_multimodal_data(section, processor)
    assert len(data.train) == 4 and "pixel_values" in data.train[0]
    # as finetune.data calls it: raw records of one split, the source for messages and relative paths
    processor.label_names = []
    raw = datasets.Dataset.from_list(rows)
    train = build_multimodal_dataset(raw, section, processor, source=str(tmp_path / "data.parquet"))
    evaluation = build_multimodal_dataset(
        raw.select([2]), section, processor, source=str(tmp_path / "data.parquet")
    )
    assert train.label_names == evaluation.label_names == ["crime", "horror", "romance"]  # one order for both
    assert make_multimodal_collator(section, processor)([train[0], train[3]])["image_mask"].all()


def test_bad_media_fails_with_the_record_number_or_is_skipped(tmp_path, processor, caplog):
    write_media(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    records = [
        RECORDS[0],
        {"image": "broken.png", "target": "x"},
        {"audio": "gone.wav", "target": "y"},
        RECORDS[2],
    ]
    path = write_jsonl(tmp_path, records)
    with pytest.raises(
        MoetuneError, match=r"data.jsonl: record 2: cannot read image .*broken.png.*on_bad_record: skip"
    ):
        build_multimodal_data({"train": str(path)}, processor)
    with caplog.at_level(logging.WARNING, logger="moetune.data"):
        data = build_multimodal_data({"train": str(path), "on_bad_record": "skip"}, processor)
    assert len(data.train) == 2
    assert "record 2: cannot read image" in caplog.text and "record 3: audio" in caplog.text
    assert "skipped 2 of 4 records" in caplog.text
    batch = make_multimodal_collator({}, processor)([data.train[0], data.train[1]])
    assert batch["image_mask"].tolist() == [True, False]


def test_a_file_that_breaks_after_the_check_is_handled_when_read(tmp_path, processor):
    write_media(tmp_path)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "later.png")
    path = write_jsonl(tmp_path, [{"image": "later.png", "target": "x"}, RECORDS[0]])
    skipping = build_multimodal_data({"train": str(path), "on_bad_record": "skip"}, processor).train
    failing = build_multimodal_data({"train": str(path)}, processor).train
    (tmp_path / "later.png").write_bytes(b"truncated")
    assert skipping[0]["input_ids"] == skipping[1]["input_ids"]  # the next good record stands in
    with pytest.raises(MoetuneError, match="record 1: cannot read image"):
        failing[0]


@pytest.mark.parametrize(
    ("records", "section", "message"),
    [
        ([{"image": 3, "target": "x"}], {}, r"record 1: 'image' must be a file path"),
        ([{"target": "x"}, {"labels": "a", "text": 5}], {}, r"record 2: 'text' must be a string"),
        ([{"foo": 1}], {}, r"record 1: the record has none of"),
        ([{"target": "x"}], {"multimodal": {"on_bad_fil": "skip"}}, r"unknown key; did you mean"),
        (
            [{"text": "t", "labels": ["zzz"]}],
            {"multimodal": {"label_names": ["a"]}},
            r"labels \['zzz'\] are not",
        ),
    ],
)
def test_malformed_records_and_options_are_one_line_errors(tmp_path, processor, records, section, message):
    path = write_jsonl(tmp_path, records)
    with pytest.raises(MoetuneError, match=message):
        build_multimodal_data({"train": str(path), **section}, processor)


def test_media_for_a_missing_encoder_is_refused(tmp_path):
    write_media(tmp_path)
    image_only = build_processor(multimodal_config("tiny", ["image"]), synthetic_mm.synthetic_tokenizer())
    with pytest.raises(MoetuneError, match="record 1: has an audio but the model has no audio encoder"):
        build_multimodal_data({"train": str(write_jsonl(tmp_path, [RECORDS[1]]))}, image_only)
    with pytest.raises(MoetuneError, match="no audio encoder"):
        prepare_multimodal_inputs(image_only, "", audio=(np.zeros(100), 8000))


def test_synthetic_sets_are_deterministic_and_held_out_differs(tmp_path):
    a = synthetic_mm.materialize("synthetic:shapes-caption:6", cache_dir=tmp_path / "a")
    b = synthetic_mm.materialize("synthetic:shapes-caption:6", cache_dir=tmp_path / "b")
    held_out = synthetic_mm.materialize(
        "synthetic:shapes-caption:6", what="data.eval", cache_dir=tmp_path / "a"
    )
    rows_a, rows_b = ([json.loads(x) for x in p.read_text().splitlines()] for p in (a, b))
    assert [r["target"] for r in rows_a] == [r["target"] for r in rows_b]
    assert Path(rows_a[0]["image"]).read_bytes() == Path(rows_b[0]["image"]).read_bytes()
    assert Path(rows_a[0]["image"]).is_absolute()
    assert held_out != a and held_out.read_text() != a.read_text()
    align = [json.loads(x)["text"] for x in synthetic_mm.materialize("synthetic:shapes-align:50", cache_dir=tmp_path).read_text().splitlines()]  # fmt: skip
    assert len(set(align)) == 50  # retrieval has one right answer
    mmimdb = json.loads(
        synthetic_mm.materialize("synthetic:mmimdb:3", cache_dir=tmp_path).read_text().splitlines()[0]
    )
    assert set(mmimdb["labels"]) <= set(synthetic_mm.MMIMDB_LABELS) and mmimdb["text"].startswith("a story")
    for bad in ("synthetic:nope", "synthetic:tones:0", "synthetic:tones:x", "synthetic:tones:1:2:3"):
        with pytest.raises(ValueError, match="synthetic"):
            synthetic_mm.parse_spec(bad)


def test_synthetic_audio_is_written_at_other_rates(tmp_path):
    path = synthetic_mm.materialize("synthetic:tones:2", cache_dir=tmp_path)
    files = [json.loads(x)["audio"] for x in path.read_text().splitlines()]
    assert {sf.info(f).samplerate for f in files} == {22050, 8000}


@pytest.mark.parametrize("name", ["mm-caption", "mm-audio", "mm-classify", "mm-align"])
def test_multimodal_recipes_are_documented_and_valid(name):
    """Header with the command; the recipe validates under the recipe schema; the synthetic specs parse."""
    from finetune.recipe import load_recipe

    path = ROOT / "recipes" / f"{name}.yaml"
    text = path.read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert header[0].startswith(f"# {name}:") and f"moetune train recipes/{name}.yaml" in text
    recipe = load_recipe(str(path))
    assert recipe.data.format == "multimodal" and set(recipe.model.modalities) <= {"image", "audio", "text"}
    for spec in (recipe.data.train, recipe.data.eval):
        synthetic_mm.parse_spec(spec)
    assert {"encoders", "projector"} <= set(recipe.adapter.targets)
