"""Output folders that appear whole or not at all: write a temporary sibling, fsync it, rename it.

Every command that writes a folder (merge, merge-adapters, export-adapter) writes it through
`atomic_output_folder`: the files go into a hidden sibling `.NAME.tmp-PID` on the same file system;
when the block ends without an error, every file and folder in it is fsynced, the sibling is renamed
onto NAME (one atomic rename) and the parent folder is fsynced, so the new name survives a power cut
too. On an error, or Ctrl-C, the sibling is removed and NAME is left as it was: nobody ever sees a
half-written folder. The rename needs the sibling on the same file system, hence a sibling and not
a folder under /tmp.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adapters.errors import MoetuneError


def check_new_output(final: Path) -> None:
    """Refuse an output that exists and is not an empty folder (nothing already written is touched)."""
    final = Path(final)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise MoetuneError(
            f"output {final} already exists and is not empty; choose a new folder or remove it"
        )


def temporary_sibling(final: Path) -> Path:
    """Where `final` is written before the rename: hidden, next to it, named for this process."""
    return final.parent / f".{final.name}.tmp-{os.getpid()}"


@contextmanager
def atomic_output_folder(final: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder; when the block succeeds, make it `final` (see the module docstring).

    replace: an existing `final` is replaced (the caller has checked that it may be: e.g. an earlier
    export); it is moved aside first and removed only after the new folder is in place. Otherwise
    `final` must not exist or be an empty folder, checked before writing and again at the rename.
    """
    final = Path(final)
    if not replace:
        check_new_output(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(final)
    shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier process with our pid that was killed
    tmp.mkdir()
    try:
        yield tmp
        _publish(tmp, final, replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a rename there is nothing left to remove


def _publish(tmp: Path, final: Path, replace: bool) -> None:
    fsync_tree(tmp)
    old = None
    if final.exists():
        if replace:
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)  # `final` is briefly absent, never half-written
        else:
            check_new_output(final)  # something appeared while we were writing
            final.rmdir()  # an empty folder: os.replace needs the name free
    os.replace(tmp, final)
    fsync_folder(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_file_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Replace one file atomically: a temporary name in the same folder, fsync, rename, fsync the folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_folder(path.parent)
    return path


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then the folders themselves (so the names are durable too)."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_folder(Path(root))


def fsync_folder(folder: Path) -> None:
    """fsync a folder's entry list; a no-op where folders cannot be opened (the rename stays atomic)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
