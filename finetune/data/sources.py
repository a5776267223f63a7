"""Data sources -> raw records (a `datasets.Dataset`), with errors that name the file and the line.

A source string is, in this order of precedence:
- `stdlib:python`: this Python's standard library .py files, one document per file (the quickstart's
  code corpus, built at run time; see `finetune.tokenizer.stdlib_source_files`);
- `synthetic:KIND[:N[:SEED]]`: text records generated at run time (`finetune.data.synthetic_text`;
  the multimodal kinds are `finetune.data.synthetic_mm`'s);
- an existing file: `.jsonl` / `.json` / `.csv` / `.parquet` through the `datasets` loaders; any other
  extension is one text document per file;
- an existing folder: a dataset written by `save_to_disk` (`load_from_disk`), else every non-hidden
  file inside (recursively): structured files when they are all of one kind, else text documents;
- a glob (`data/**/*.py`), treated like the files it matches;
- a hub dataset id `owner/name` or `owner/name:split` (downloads through `datasets`; offline is a
  clear error).
`PATH:split` picks a split of a saved `DatasetDict`.
A malformed JSON Lines line is an error naming the file and line, or, with `skip_malformed`
(`data.on_bad_record: skip`), skipped and counted in a warning.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import datasets

from finetune.errors import MoetuneError

logger = logging.getLogger("moetune.data")

STRUCTURED = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")
STDLIB = "stdlib:python"


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """No `datasets` progress bars or error logs while loading: they would bury the one-line errors and
    warnings (a loader failure becomes a MoetuneError that names the file and line anyway)."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    library_logger = logging.getLogger("datasets")
    level = library_logger.level
    library_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        library_logger.setLevel(level)
        if not was_disabled:
            datasets.enable_progress_bars()


def load_source(spec: str | list[str], *, what: str, skip_malformed: bool = False) -> datasets.Dataset:
    """Raw records of one source (or a list of sources, concatenated). `what` names the recipe key;
    `skip_malformed` skips JSON Lines lines that are not a JSON object (counted in a warning)."""
    specs = spec if isinstance(spec, list) else [spec]
    with quiet_datasets():
        parts = [_load_one(s, what=what, skip_malformed=skip_malformed) for s in specs]
    if len(parts) == 1:
        return parts[0]
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError as err:
        raise MoetuneError(
            f"{what}: the sources {specs} have different fields and cannot be combined ({_first_line(err)})"
        ) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or err.__class__.__name__
    return text.splitlines()[0][:300]


def _load_one(spec: str, *, what: str, skip_malformed: bool = False) -> datasets.Dataset:
    if spec == STDLIB:
        return stdlib_documents()
    if spec.startswith("stdlib:"):
        raise MoetuneError(f"{what}: unknown special source '{spec}'; the only one is '{STDLIB}'")
    if spec.startswith(
        "synthetic:"
    ):  # text generated at run time (multimodal kinds: finetune.data.synthetic_mm)
        from finetune.data.synthetic_text import synthetic_records

        try:
            return synthetic_records(spec, what=what)
        except ValueError as err:
            raise MoetuneError(f"{what}: {err}") from err
    spec = os.path.expanduser(spec)  # `--set data.train=~/corpus`: the shell leaves that ~ alone
    path, split = _split_suffix(spec)
    if path.is_file():
        return _load_files([path], what=what, named=True, skip_malformed=skip_malformed)
    if path.is_dir():
        return _load_folder(path, split, what=what, skip_malformed=skip_malformed)
    if any(c in spec for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise MoetuneError(f"{what}: the pattern '{spec}' matches no files")
        return _load_files(files, what=what, named=False, skip_malformed=skip_malformed)
    if (
        HUB_ID.match(spec)
        and Path(spec).suffix.lower() not in STRUCTURED
        and not Path(spec.split("/")[0]).is_dir()
    ):
        return _load_hub(spec, what=what)
    raise MoetuneError(f"{what}: no such file or folder: {spec}")


def _split_suffix(spec: str) -> tuple[Path, str | None]:
    """`folder:split` -> (folder, split) when `folder` exists; otherwise the whole string is the path."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and re.fullmatch(r"[\w.-]+", tail) and Path(head).is_dir():
        return Path(head), tail
    return Path(spec), None


# ----------------------------------------------------------------------------- files


def _load_files(
    files: list[Path], *, what: str, named: bool, skip_malformed: bool = False
) -> datasets.Dataset:
    """Structured files through their `datasets` loader (all of one kind), else text documents.

    `named`: the user named this one file, so an undecodable text file is an error, not a skip."""
    kinds = {STRUCTURED.get(f.suffix.lower()) for f in files}
    if len(kinds) == 1 and None not in kinds:
        return _load_structured(kinds.pop(), files, what=what, skip_malformed=skip_malformed)
    return _text_documents(files, what=what, strict=named)


def _load_folder(
    folder: Path, split: str | None, *, what: str, skip_malformed: bool = False
) -> datasets.Dataset:
    if (folder / "dataset_dict.json").exists() or (folder / "state.json").exists():
        return _load_saved(folder, split, what=what)
    if split is not None:
        raise MoetuneError(f"{what}: '{folder}' is not a saved DatasetDict, so ':{split}' names no split")
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not files:
        raise MoetuneError(f"{what}: the folder '{folder}' has no files")
    return _load_files(files, what=what, named=False, skip_malformed=skip_malformed)


def _load_saved(folder: Path, split: str | None, *, what: str) -> datasets.Dataset:
    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as err:  # noqa: BLE001  (any failure of a user's folder is a user-facing error)
        raise MoetuneError(f"{what}: cannot load the saved dataset '{folder}' ({_first_line(err)})") from err
    if isinstance(loaded, datasets.DatasetDict):
        wanted = (
            [split] if split else (["train"] if what.endswith("train") else ["validation", "test", "eval"])
        )
        for name in wanted:
            if name in loaded:
                return loaded[name]
        raise MoetuneError(
            f"{what}: the saved DatasetDict '{folder}' has splits {list(loaded)}, not {wanted[0]!r}; "
            f"name one as '{folder}:SPLIT'"
        )
    if split is not None:
        raise MoetuneError(f"{what}: '{folder}' is a single Dataset, so ':{split}' names no split")
    return loaded


def _load_structured(
    kind: str, files: list[Path], *, what: str, skip_malformed: bool = False
) -> datasets.Dataset:
    for f in files:
        if f.stat().st_size == 0:
            raise MoetuneError(f"{what}: {f} is empty; it has no records")
    with tempfile.TemporaryDirectory(prefix="moetune-jsonl-") as scratch:
        if kind == "json" and skip_malformed:
            files = [_without_malformed_lines(f, Path(scratch), what=what) for f in files]
        elif kind == "json":
            for f in files:
                _check_json(f, what=what)
        return _load_checked(kind, files, what=what)


def _load_checked(kind: str, files: list[Path], *, what: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
    except Exception as err:  # noqa: BLE001  (pyarrow / datasets raise many types; find the bad line)
        if kind == "json":
            for f in files:
                _check_json(f, what=what, parse_objects=True)
        cause = err.__cause__ or err.__context__ or err
        names = ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
        raise MoetuneError(f"{what}: cannot read {names} as {kind} ({_first_line(cause)})") from err


def _check_json(path: Path, *, what: str, parse_objects: bool = False) -> None:
    """Raise a MoetuneError naming the first line of a JSON Lines (or JSON) file that is not an object.

    Run BEFORE the `datasets` loader, not only after it fails: pyarrow's JSON reader (pyarrow 26)
    crashes the process (a segfault, no message) on a line that is valid JSON but not an object, such
    as `null`. A JSON Lines line that starts with `{` is only parsed when `parse_objects` is set (after
    the loader failed), so the common case costs one pass over the bytes."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise MoetuneError(f"{what}: {path} line {line}: not UTF-8 text; save the file as UTF-8") from err
    if path.suffix.lower() == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            raise MoetuneError(f"{what}: {path} line {err.lineno}: malformed JSON ({err.msg})") from err
        if not isinstance(doc, list | dict):
            raise MoetuneError(f"{what}: {path}: expected a list of records, got a JSON {_json_type(doc)}")
        if isinstance(doc, list) and not all(isinstance(r, dict) for r in doc):
            raise MoetuneError(f"{what}: {path}: every item of the top-level list must be an object")
        return
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or (stripped.startswith("{") and not parse_objects):
            continue
        try:
            record = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise MoetuneError(
                f"{what}: {path} line {number}: malformed JSON ({err.msg}); fix or remove it"
            ) from err
        if not isinstance(record, dict):
            raise MoetuneError(
                f"{what}: {path} line {number}: expected a JSON object per line, got {_json_type(record)}"
            )


def _without_malformed_lines(path: Path, scratch: Path, *, what: str) -> Path:
    """`path`, or a copy in `scratch` without the lines that are not a JSON object (skipped, counted
    and reported in a warning). A `.json` file is one document: it cannot lose a line, so it is checked."""
    if path.suffix.lower() == ".json":
        _check_json(path, what=what)
        return path
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise MoetuneError(f"{what}: {path}: not UTF-8 text; save the file as UTF-8") from err
    good, bad = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            bad.append(f"line {number}: malformed JSON ({err.msg})")
            continue
        if not isinstance(record, dict):
            bad.append(f"line {number}: expected a JSON object, got {_json_type(record)}")
            continue
        good.append(line)
    if not bad:
        return path
    if not good:
        raise MoetuneError(
            f"{what}: {path}: none of its {len(bad)} line(s) is a JSON object (first: {bad[0]})"
        )
    logger.warning(
        "%s: %s: skipped %d malformed JSON line(s) of %d (data.on_bad_record: skip); first: %s",
        what,
        path,
        len(bad),
        len(bad) + len(good),
        bad[0],
    )
    clean = scratch / f"{len(list(scratch.iterdir()))}-{path.name}"
    clean.write_text("\n".join(good) + "\n", encoding="utf-8")
    return clean


def _json_type(value: object) -> str:
    names = {
        type(None): "null",
        bool: "boolean",
        int: "number",
        float: "number",
        str: "string",
        list: "array",
    }
    return names.get(type(value), type(value).__name__)


def _text_documents(files: list[Path], *, what: str, strict: bool) -> datasets.Dataset:
    """One record {"text", "source"} per file. Binary or non-UTF-8 files are skipped (and counted) unless
    `strict`, where they are an error."""
    texts, sources, skipped = [], [], []
    for f in files:
        raw = f.read_bytes()
        try:
            if b"\0" in raw[:8192]:
                raise UnicodeDecodeError("utf-8", raw, 0, 1, "binary file (NUL byte)")
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            if strict:
                raise MoetuneError(
                    f"{what}: {f} is not UTF-8 text ({err.reason}); convert it or remove it"
                ) from err
            skipped.append(f)
            continue
        texts.append(text)
        sources.append(str(f))
    if skipped:
        logger.warning(
            "%s: skipped %d binary or non-UTF-8 file(s), e.g. %s",
            what,
            len(skipped),
            ", ".join(map(str, skipped[:3])),
        )
    if not texts:
        raise MoetuneError(f"{what}: none of the {len(files)} file(s) is UTF-8 text")
    return datasets.Dataset.from_dict({"text": texts, "source": sources})


def stdlib_documents() -> datasets.Dataset:
    """The standard library's .py files (tests and site-packages excluded), sorted: same list, same order,
    every run on a machine. Nothing is copied into the repository."""
    from finetune.tokenizer import stdlib_source_files

    files = stdlib_source_files()
    if not files:
        raise MoetuneError(f"data source '{STDLIB}': no standard library sources found on this machine")
    return _text_documents(files, what=STDLIB, strict=False)


# ----------------------------------------------------------------------------- hub


def _load_hub(spec: str, *, what: str) -> datasets.Dataset:
    repo, _, split = spec.partition(":")
    offline = any(
        os.environ.get(v, "").lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )
    if offline:
        raise MoetuneError(
            f"{what}: '{spec}' is not a local file or folder, and the hub is off (HF_HUB_OFFLINE / "
            "HF_DATASETS_OFFLINE is set); download it first or point to local files"
        )
    try:
        return datasets.load_dataset(repo, split=split or "train")
    except Exception as err:  # noqa: BLE001  (network, auth, missing repo: all user-facing)
        raise MoetuneError(
            f"{what}: cannot load hub dataset '{repo}' (split {split or 'train'}): {_first_line(err)}; "
            "check the id, the network and your token"
        ) from err
