"""adapters.output_folder: a folder appears whole (fsynced, then renamed) or not at all."""

from __future__ import annotations

import os

import pytest

from adapters import output_folder
from adapters.errors import MoetuneError
from adapters.output_folder import atomic_output_folder, write_file_atomic


def test_a_finished_folder_is_fsynced_before_its_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(
        output_folder.os,
        "fsync",
        lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd),
    )
    monkeypatch.setattr(
        output_folder.os,
        "replace",
        lambda a, b: events.append(("replace", str(a), str(b))) or real_replace(a, b),
    )
    final = tmp_path / "out"
    with atomic_output_folder(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
        (tmp / "a.json").write_text("{}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"x")
        assert not final.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (final / "sub" / "b.bin").read_bytes() == b"x"
    rename = events.index(("replace", str(tmp), str(final)))
    synced = {path for kind, path, *_ in events[:rename] if kind == "fsync"}
    assert {str(tmp / "a.json"), str(tmp / "sub" / "b.bin"), str(tmp / "sub"), str(tmp)} <= synced
    assert ("fsync", str(tmp_path)) in events[rename:]  # the new name is durable too


def test_an_error_leaves_no_output_and_no_temporary_folder(tmp_path):
    with pytest.raises(RuntimeError, match="disk full"), atomic_output_folder(tmp_path / "out") as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_folder_is_refused_before_anything_is_written_or_replaced_when_asked(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "mine.txt").write_text("keep me")
    with (
        pytest.raises(MoetuneError, match="already exists and is not empty") as err,
        atomic_output_folder(final),
    ):
        pytest.fail("refused on entry: the block must not run")
    assert "\n" not in str(err.value) and (final / "mine.txt").read_text() == "keep me"

    with atomic_output_folder(final, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]

    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_output_folder(empty) as tmp:  # an empty folder is a fine target
        (tmp / "x").write_text("x")
    assert (empty / "x").is_file()


def test_write_file_atomic_replaces_a_file_whole(tmp_path):
    target = tmp_path / "README.md"
    target.write_text("old")
    write_file_atomic(target, "new text")
    assert target.read_text() == "new text" and sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]
