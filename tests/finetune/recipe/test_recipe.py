"""Recipe schema: YAML + --set overrides, types, defaults, conflicts, errors that name the file and key."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune.errors import MoetuneError
from finetune.recipe import (
    SECTIONS,
    DataSection,
    Recipe,
    describe_keys,
    keys_markdown,
    list_recipes,
    load_recipe,
    parse_yaml,
    recipe_from_dict,
    recipe_to_dict,
    save_recipe,
)

ROOT = Path(__file__).resolve().parents[3]
MINIMAL = "model:\n  name: preset:tiny\nadapter:\n  targets: [attention, experts]\ndata:\n  train: d.jsonl\n"


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path, overrides=()) -> str:
    with pytest.raises(MoetuneError) as info:
        load_recipe(str(path), overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_minimal_recipe_gets_documented_defaults(tmp_path):
    recipe = load_recipe(str(write(tmp_path, MINIMAL, "my-run.yaml")))
    assert isinstance(recipe, Recipe)
    assert recipe.model.name == "preset:tiny" and recipe.model.dtype == "auto"
    assert recipe.adapter.targets == ["attention", "experts"]
    assert (recipe.adapter.r, recipe.adapter.alpha, recipe.adapter.router) == (16, 32, "frozen")
    assert recipe.data.format is None and recipe.data.on_bad_record == "fail"  # None: inferred from the data
    assert recipe.train.epochs == 1 and recipe.train.max_steps is None  # documented: 1 epoch when neither
    assert recipe.output.dir == "runs/my-run" and recipe.output.report_to == ["tensorboard"]


def test_a_recipe_with_only_a_model_and_data_trains_attention_and_experts_and_says_so(tmp_path):
    path = write(tmp_path, "model:\n  name: preset:tiny\ndata:\n  train: d.jsonl\n", "bare.yaml")
    recipe = load_recipe(str(path))
    assert recipe.adapter.targets == ["attention", "experts"]
    (note,) = recipe.notes
    assert "bare.yaml: defaults used: adapter.targets=[attention, experts], adapter.r=16," in note
    assert "train.epochs=1" in note and "output.dir=runs/bare" in note
    # A recipe that sets those keys relies on no headline default and gets no note.
    full = load_recipe("quickstart")
    assert not [n for n in full.notes if "adapter.targets" in n or "train.lr" in n]


def test_one_target_may_be_a_plain_string(tmp_path):
    recipe = load_recipe(str(write(tmp_path, MINIMAL.replace("[attention, experts]", "attention"))))
    assert recipe.adapter.targets == ["attention"]
    overridden = load_recipe(str(write(tmp_path, MINIMAL)), ["adapter.targets=experts"])
    assert overridden.adapter.targets == ["experts"]


@pytest.mark.parametrize(
    "recipe_keys, override, dropped",
    [
        ("train:\n  epochs: 2\n", "train.max_steps=5", ("train", "epochs")),
        ("train:\n  max_steps: 100\n", "train.epochs=3", ("train", "max_steps")),
        ("train:\n  warmup_fraction: 0.1\n", "train.warmup_steps=4", ("train", "warmup_fraction")),
        ("data:\n  train: d.jsonl\n  eval_fraction: 0.1\n", "data.eval=e.jsonl", ("data", "eval_fraction")),
        ("data:\n  train: d.jsonl\n  group_by_length: true\n", "data.packing=true", ("data", "group_by_length")),
    ],
)  # fmt: skip
def test_an_override_replaces_the_recipe_key_it_conflicts_with_and_says_so(
    tmp_path, recipe_keys, override, dropped
):
    raw = yaml.safe_load(MINIMAL)
    for section, body in yaml.safe_load(recipe_keys).items():
        raw[section] = {**raw.get(section, {}), **body}
    recipe = load_recipe(str(write(tmp_path, yaml.safe_dump(raw))), [override])
    key, value = override.split("=")
    assert getattr(getattr(recipe, key.split(".")[0]), key.split(".")[1]) == yaml.safe_load(value)
    assert getattr(getattr(recipe, dropped[0]), dropped[1]) in (None, False)
    assert recipe.warnings == [
        f"--set {override} replaces the recipe's {'.'.join(dropped)}: "
        f"{raw[dropped[0]][dropped[1]] if not isinstance(raw[dropped[0]][dropped[1]], bool) else 'true'} "
        "(the two cannot both be set)"
    ]


def test_bundled_recipes_take_the_overrides_of_the_first_hour():
    esft = load_recipe("esft", ["train.max_steps=5"])  # the recipe trains by epochs
    assert (esft.train.max_steps, esft.train.epochs) == (5, None)
    # save_every 100 is beyond a 2-step run: the checkpoint is the one saved at the end
    quick = load_recipe("quickstart", ["train.max_steps=2"])
    assert (quick.train.max_steps, quick.train.save_every) == (2, 100)


def test_several_problems_are_reported_together_one_line_each(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # errors name the file relative to the working folder
    raw = yaml.safe_load(MINIMAL)
    raw["train"] = {"lrr": 1, "batch_size": "two", "epochs": 2, "max_steps": 3}
    raw["data"]["max_length"] = 0
    path = write(tmp_path, yaml.safe_dump(raw))
    with pytest.raises(MoetuneError) as info:
        load_recipe(str(path))
    lines = str(info.value).splitlines()
    assert lines[0] == "r.yaml: 4 problems; fix each:"
    assert [line.strip() for line in lines[1:]] == [
        "r.yaml: train.batch_size: expected an integer, got 'two'",
        "r.yaml: unknown key 'train.lrr'; did you mean 'train.lr'?",
        "r.yaml: data.max_length must be >= 2, got 0",
        "r.yaml: train.max_steps and train.epochs both set; keep one",
    ]
    with pytest.raises(MoetuneError) as info:
        load_recipe(str(write(tmp_path, "", "empty.yaml")))
    assert [line.split(" (")[0].strip() for line in str(info.value).splitlines()] == [
        "empty.yaml: 2 problems; fix each:",
        "empty.yaml: missing required key 'model.name'",
        "empty.yaml: missing required key 'data.train'",
    ]


def test_adapter_keys_are_exactly_apply_lora_keyword_arguments():
    # The training loop calls apply_lora(model, **asdict(recipe.adapter)).
    keys = [f.name for f in dataclasses.fields(SECTIONS["adapter"])]
    assert keys == [
        "targets", "r", "alpha", "dropout", "layers", "experts", "router", "use_rslora", "group_overrides",
    ]  # fmt: skip
    import inspect

    from adapters import apply_lora

    params = inspect.signature(apply_lora).parameters
    assert set(keys) <= set(params), set(keys) - set(params)


def test_overrides_are_parsed_as_yaml(tmp_path):
    path = write(tmp_path, MINIMAL)
    recipe = load_recipe(
        str(path),
        [
            "train.lr=1e-4",
            "adapter.r=8",
            "data.packing=true",
            "adapter.experts={0: [1, 2], 1: [3]}",
            "data.train=[a.jsonl, b.jsonl]",
            "train.max_grad_norm=null",
            "output.report_to=[tensorboard, wandb]",
            "train.mixed_precision=no",
            "model.modalities=[image, audio]",
        ],
    )
    assert recipe.model.modalities == ["image", "audio"]
    assert recipe.train.lr == 1e-4 and isinstance(recipe.train.lr, float)
    assert recipe.adapter.r == 8 and recipe.data.packing is True
    assert recipe.adapter.experts == {0: [1, 2], 1: [3]}
    assert recipe.data.train == ["a.jsonl", "b.jsonl"]
    assert recipe.train.max_grad_norm is None
    assert recipe.train.mixed_precision == "no"


def test_scientific_floats_without_a_dot_are_floats_in_files(tmp_path):
    recipe = load_recipe(str(write(tmp_path, MINIMAL + "train:\n  lr: 3e-4\n  weight_decay: 1E-2\n")))
    assert recipe.train.lr == 3e-4 and recipe.train.weight_decay == 0.01


def test_integers_are_accepted_for_floats_and_integral_floats_for_integers(tmp_path):
    recipe = load_recipe(str(write(tmp_path, MINIMAL + "train:\n  lr: 1\n  max_steps: 1e3\n")))
    assert recipe.train.lr == 1.0 and isinstance(recipe.train.lr, float)
    assert recipe.train.max_steps == 1000 and isinstance(recipe.train.max_steps, int)


@pytest.mark.parametrize(
    "extra, expected",
    [
        ("train:\n  lrr: 1e-4\n", r"r\.yaml: unknown key 'train\.lrr'; did you mean 'train\.lr'\?"),
        (
            "train:\n  max_length: 512\n",
            r"unknown key 'train\.max_length'; did you mean 'data\.max_length'\?",
        ),
        ("trian:\n  lr: 1\n", r"unknown section 'trian'; did you mean 'train'\?"),
        ("lr: 1\n", r"unknown section 'lr'; keys live inside a section, e.g. 'train\.lr'"),
        ("train:\n  lr: fast\n", r"r\.yaml: train\.lr: expected a number, got 'fast'"),
        ("train:\n  batch_size: 2.5\n", r"train\.batch_size: expected an integer, got 2\.5"),
        ("train:\n  batch_size: true\n", r"train\.batch_size: expected an integer, got True"),
        ("data:\n  packing: 1\n", r"data\.packing: expected true or false, got 1"),
        (
            "train:\n  schedule: cosin\n",
            r"train\.schedule: expected cosine \| linear \| constant, got 'cosin'",
        ),
        (
            "adapter:\n  targets: {attention: 1}\n",
            r"adapter\.targets: expected a list of strings, got \{'attention': 1\}",
        ),
        ("train:\n  lr: .nan\n", r"train\.lr: expected a number, got nan"),
        ("train:\n  batch_size: 0\n", r"train\.batch_size must be >= 1, got 0"),
        ("train:\n  lr: -1\n", r"train\.lr must be > 0, got -1"),
        ("data:\n  eval_fraction: 1.0\n", r"data\.eval_fraction must be in \(0, 1\), got 1\.0"),
        ("adapter:\n  dropout: 1.5\n", r"adapter\.dropout must be in \[0, 1\), got 1\.5"),
        (
            "output:\n  push_to_hub: 'not a repo!'\n",
            r"output\.push_to_hub 'not a repo!' is not a hub repo id",
        ),
        ("model:\n  dtype: fp32\n", r"model\.dtype: expected auto \| float32 \| bfloat16 \| float16"),
        ("train: [1, 2]\n", r"section 'train' must be a mapping of keys, not list"),
    ],
)
def test_mistakes_name_the_file_the_key_and_the_fix(tmp_path, extra, expected):
    raw = yaml.safe_load(MINIMAL)
    for section, body in yaml.safe_load(extra).items():
        raw[section] = {**raw[section], **body} if isinstance(raw.get(section), dict) else body
    path = write(tmp_path, yaml.safe_dump(raw))
    assert re.search(expected, error_of(path)), error_of(path)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.warmup_steps=10", "train.warmup_fraction=0.1"], "train.warmup_steps and train.warmup_fraction both set; keep one"),
        (["train.max_steps=10", "train.epochs=2"], "train.max_steps and train.epochs both set; keep one"),
        (["data.eval=e.jsonl", "data.eval_fraction=0.1"], "data.eval and data.eval_fraction both set; keep one"),
        (["data.packing=true", "data.group_by_length=true"], "data.packing and data.group_by_length both set; keep one"),
        (["train.eval_every=10"], "train.eval_every is set but there is no eval data"),
        (["train.eval_batches=10"], "train.eval_batches is set but there is no eval data"),
        (["output.private=true"], "output.private is set but output.push_to_hub is null"),
        (["data.format=multimodal", "data.packing=true"], "data.packing is not supported with data.format: multimodal"),
        (["train.mixed_precision=fp16", "model.dtype=bfloat16"], "train.mixed_precision fp16 contradicts model.dtype bfloat16"),
        (["data.pad_to_multiple_of=64", "data.max_length=32"], "data.pad_to_multiple_of (64) exceeds data.max_length (32)"),
        (["data.multimodal={prompt: x}"], "data.multimodal is set but data.format is not multimodal"),
        (["model.modalities=[image]", "model.name=org/model"], "model.modalities applies to preset:NAME models only"),
        (["data.format=multimodal", "data.group_by_length=true"], "data.group_by_length is not supported with data.format: multimodal"),
    ],
)  # fmt: skip
def test_conflicting_values_are_refused(tmp_path, overrides, expected):
    assert expected in error_of(write(tmp_path, MINIMAL), overrides)


def test_multimodal_options_are_checked_when_the_recipe_loads(tmp_path):
    pytest.importorskip("finetune.data.multimodal", reason="the multimodal half checks its own options")
    path = write(tmp_path, MINIMAL)
    ok = load_recipe(str(path), ["data.format=multimodal", "data.multimodal={verify_media: header}"])
    assert ok.data.multimodal == {"verify_media": "header"}
    message = error_of(path, ["data.format=multimodal", "data.multimodal={verify_medi: header}"])
    assert "r.yaml: data.multimodal.verify_medi: unknown key; did you mean 'verify_media'?" in message


@pytest.mark.parametrize(
    "text, expected",
    [
        ("adapter:\n  targets: [attention]\ndata:\n  train: d.jsonl\n", "missing required key 'model.name'"),
        ("model:\n  name: preset:tiny\nadapter:\n  targets: [x]\n", "missing required key 'data.train'"),
        (MINIMAL.replace("[attention, experts]", "[]"), "'adapter.targets' is required and empty"),
        (MINIMAL.replace("preset:tiny", "''"), "'model.name' is required and empty"),
        (
            "- a\n- b\n",
            "a recipe is a mapping with sections model, adapter, data, train, output, eval; got list",
        ),
        ("model:\n  name: a\n  name: b\n", "line 3: duplicate key 'name'; keep one"),
        ("model: [unclosed\n", "r.yaml: line 2"),
    ],
)
def test_missing_values_and_malformed_files(tmp_path, text, expected):
    assert expected in error_of(write(tmp_path, text))


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lrr=1", "--set train.lrr: unknown key 'train.lrr'; did you mean 'train.lr'?"),
        ("train.lr", "--set train.lr: expected SECTION.KEY=VALUE"),
        ("lr=1", "--set lr=1: expected SECTION.KEY=VALUE"),
        ("train.lr=[1", "--set train.lr=[1: line 1"),
        ("train.lr=abc", "--set train.lr: expected a number, got 'abc'"),
        ("adapter.experts.3=[1]", "is nested too deep"),
    ],
)
def test_override_mistakes_name_the_flag(tmp_path, override, expected):
    assert expected in error_of(write(tmp_path, MINIMAL), [override])


def test_unknown_recipe_name_suggests_a_bundled_one():
    with pytest.raises(
        MoetuneError, match=r"quickstar: no such recipe file or bundled recipe; did you mean 'quickstart'\?"
    ):
        load_recipe("quickstar")


def test_bundled_recipes_load_by_name_path_and_stem():
    by_name = load_recipe("gpu/qwen3-moe")
    assert by_name == load_recipe("qwen3-moe") == load_recipe(str(ROOT / "recipes/gpu/qwen3-moe.yaml"))
    assert by_name.output.dir == "runs/qwen3-moe-ultrachat"
    assert load_recipe("recipes/quickstart.yaml").model.name == "preset:tiny"


def test_save_recipe_round_trips_every_key(tmp_path):
    recipe = load_recipe("quickstart", ["train.lr=1e-4", "adapter.experts={0: [1]}", "data.separator=' -> '"])
    path = save_recipe(recipe, tmp_path / "run" / "recipe.yaml")
    assert load_recipe(str(path)) == recipe
    saved = yaml.safe_load(path.read_text())
    assert saved == recipe_to_dict(recipe)
    assert set(saved) == set(SECTIONS)
    assert all(set(saved[s]) == {f.name for f in dataclasses.fields(c)} for s, c in SECTIONS.items())
    assert not list(path.parent.glob(".*tmp*"))  # written through a temporary name, then renamed


def test_every_key_is_documented_in_code_and_in_the_docs():
    docs = (ROOT / "docs" / "recipes-and-data.md").read_text()
    rows = describe_keys()
    assert len(rows) == sum(len(dataclasses.fields(c)) for c in SECTIONS.values()) > 50
    for key, type_name, default, help_text in rows:
        assert help_text and type_name and default
        assert f"`{key}`" in docs, f"{key} is not in docs/recipes-and-data.md"
    # The reference table is generated (`python -m finetune.recipe`), so it cannot drift from the code.
    assert keys_markdown() in docs, "regenerate the key table: python -m finetune.recipe"


def test_list_recipes_gives_one_line_each():
    rows = dict(list_recipes())
    assert {"quickstart", "domain-text", "instruct", "chat", "esft"} <= set(rows)
    assert {"gpu/deepseek-v3", "gpu/qwen3-moe", "gpu/mixtral"} <= set(rows)
    assert all(desc and "\n" not in desc for desc in rows.values())
    assert not any(name.startswith("accelerate/") for name in rows)


def test_data_section_defaults_match_docs_table():
    # DataSection() needs train; defaults for the rest are what describe_keys() shows.
    section = DataSection(train="x")
    shown = {k: d for k, _, d, _ in describe_keys() if k.startswith("data.")}
    assert shown["data.max_length"] == json.dumps(section.max_length)
    assert shown["data.format"] == json.dumps(section.format)


# ----------------------------------------------------------------------------- property-based
# Seeded (derandomize): the same examples on every run. Each property also asserts that a real share
# of its examples took the "loads" branch, so it cannot pass with every example failing.

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 10_000), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.text(max_size=6), max_size=3),
    st.dictionaries(st.integers(-2, 4), st.lists(st.integers(-2, 9), max_size=3), max_size=2),
)  # fmt: skip
_known = [k for k, *_ in describe_keys()]
_defaults = {k: json.loads(d) for k, _, d, _ in describe_keys() if d != "required"}
_keys = st.one_of(st.sampled_from(_known), st.text(min_size=1, max_size=10).map(lambda s: f"train.{s}"))


def _names_the_file(line: str) -> bool:
    return line.strip().split(": ")[0].endswith("random.yaml")


def _outcome(load) -> str:
    """'loaded', or 'refused' after checking the error: MoetuneError, every line naming the file."""
    try:
        load()
    except MoetuneError as err:
        lines = str(err).splitlines()
        assert all(_names_the_file(line) for line in lines), lines
        return "refused"
    return "loaded"


def test_random_recipes_either_load_or_fail_with_moetune_error():
    outcomes = []

    @settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    # Keys set to their documented defaults (valid) plus a few keys set to anything (mostly invalid).
    @given(st.lists(st.sampled_from(sorted(_defaults)), max_size=6), st.dictionaries(_keys, _scalars, max_size=3),
           st.booleans())  # fmt: skip
    def check(valid, assignments, with_minimal):
        raw: dict = yaml.safe_load(MINIMAL) if with_minimal else {}
        for key, value in [(k, _defaults[k]) for k in valid] + list(assignments.items()):
            section, name = key.split(".", 1)
            raw.setdefault(section, {})[name] = value
        outcome = _outcome(lambda: recipe_from_dict(raw, "random.yaml"))
        if outcome == "loaded":  # what loads, round-trips
            recipe = recipe_from_dict(raw, "random.yaml")
            assert recipe_from_dict(recipe_to_dict(recipe), "again.yaml") == recipe
        outcomes.append(outcome)

    check()
    assert len(outcomes) == 150
    assert outcomes.count("loaded") >= 15, f"only {outcomes.count('loaded')} of 150 random recipes loaded"
    assert outcomes.count("refused") >= 15


def test_random_yaml_text_either_loads_or_fails_with_moetune_error(tmp_path):
    """Random edits of a valid recipe file: a cut, or random text inserted anywhere."""
    outcomes = []

    @settings(max_examples=100, deadline=None, derandomize=True)
    @given(st.integers(0, len(MINIMAL)), st.integers(0, 8), st.text(max_size=20))
    def check(at, cut, inserted):
        path = tmp_path / "random.yaml"
        path.write_text(MINIMAL[:at] + inserted + MINIMAL[at + cut :], encoding="utf-8")
        outcomes.append(_outcome(lambda: load_recipe(str(path))))

    check()
    assert len(outcomes) == 100
    assert outcomes.count("loaded") >= 10 and outcomes.count("refused") >= 10, outcomes


def test_the_docs_example_recipe_and_override_commands_are_valid():
    docs = (ROOT / "docs" / "recipes-and-data.md").read_text()
    example = re.search(r"```yaml\n(.*?)```", docs, re.S)[1]
    recipe = recipe_from_dict(parse_yaml(example, "docs example"), "docs example")
    assert recipe.data.format == "instruction" and recipe.train.lr == 2e-4
    for command in re.findall(r"^moetune train (.+?)(?:\s+#.*)?$", docs, re.M):
        words = shlex.split(command)
        overrides = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
        target = words[0] if words[0] != "my.yaml" else None
        if target is None:
            recipe_from_dict(parse_yaml(example, "my.yaml"), "my.yaml", overrides=overrides)
        else:
            load_recipe(target, overrides)
