"""Files and folders that appear complete or not at all: write under a temporary name, then rename.

One temporary-name convention for everything: `.<name>.tmp-<pid>` beside the target (hidden, and
unique per process, so two ranks never share one). A crash leaves the previous file or folder (or
none) and a stray temporary that a later attempt removes; readers never see half a file.

- `write_atomic(path, data)`: bytes or text, flushed and fsynced, then renamed into place.
- `atomic_file(path)`: for writers that stream into a path themselves (safetensors' `save_file`,
  PyAV): yields the temporary path, fsyncs and renames it on success, removes it on error.
- `temp_path(path)`: the temporary path alone, for writers that commit later (`student.video`).
- `atomic_folder(folder)`: a folder built under a temporary name and swapped into place.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary name beside `path` that this process writes before renaming: `.<name>.tmp-<pid>`."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield the temporary path to write `path` through; on success it is fsynced and renamed into place."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` (text is UTF-8) to a temporary name beside `path`, flush, fsync, rename into place."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `folder`; on success it replaces `folder`."""
    final = Path(folder)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
