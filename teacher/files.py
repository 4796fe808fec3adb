"""Files and folders that appear complete or not at all: write under a temporary name, then rename.

One temporary-name convention for everything: `.<name>.tmp-<pid>` beside the target (hidden, and
unique per process, so two ranks never share one). A crash leaves the previous file or folder (or
none) and a stray temporary that a later attempt removes; readers never see half a file.

- `write_atomic(path, data)`: bytes or text, flushed and fsynced, then renamed into place.
- `atomic_file(path)`: for writers that stream into a path themselves (safetensors' `save_file`,
  PyAV): yields the temporary path, fsyncs and renames it on success, removes it on error.
- `temp_path(path)`: the temporary path alone, for writers that commit later (`student.video`).
- A write that fails for want of space (or any OSError that names no file) is re-raised naming the
  path it was writing; the temporary is removed. `read_text(path, what)` reads a UTF-8 text file
  that a user names (recipe, prompts) with one-line errors naming it.
- `atomic_folder(folder)`: a folder built under a temporary name and swapped into place. It leaves a
  small `FOLDER_MARKER` file inside, and it replaces an existing folder only when that folder is
  empty or holds the marker (or a file the caller names as its own, `ours`): nothing a command did
  not create is ever deleted. `check_replaceable` is that rule, for commands that check before
  any compute (and that also refuse an output folder that is, or contains, one of their inputs).
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

FOLDER_MARKER = ".shotdistill-folder"  # inside every folder atomic_folder wrote: it may be replaced


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary name beside `path` that this process writes before renaming: `.<name>.tmp-<pid>`."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _named(error: OSError, path: Path) -> OSError:
    """`error` itself when it names a file, else the same error naming `path` (ENOSPC from a write)."""
    if error.filename is not None or error.errno is None:
        return error
    return type(error)(error.errno, error.strerror or os.strerror(error.errno), str(path))


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """The UTF-8 text of `path`; a missing file, a folder or bytes that are not UTF-8 raise one line
    naming `path` and `what` it should be."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder, not a {what}")
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: {what} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                         f"{e.start})") from None


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
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _named(e, path) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` (text is UTF-8) to a temporary name beside `path`, fsync, rename into place."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def check_replaceable(folder: str | os.PathLike, ours: Iterable[str] = (),
                      inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Raise (one line naming `folder`) unless writing `folder` can delete nothing we did not write:
    it is absent, an empty folder, or a folder holding FOLDER_MARKER or one of the files `ours`; and
    it neither is nor contains any of `inputs`."""
    final = Path(folder)
    resolved = final.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if resolved == source or resolved in source.parents:
            raise ValueError(f"{final}: is or contains {source}, an input of this command; "
                             "refusing to replace it: choose another output folder")
    if not final.exists() and not final.is_symlink():
        return
    if not final.is_dir() or final.is_symlink():
        raise FileExistsError(f"{final}: exists and is not a plain folder; refusing to replace it")
    if (final / FOLDER_MARKER).is_file() or any((final / name).exists() for name in ours):
        return
    if any(final.iterdir()):
        raise FileExistsError(f"{final}: not empty and not written by shotdistill (no {FOLDER_MARKER}); "
                              "refusing to replace it: choose another output folder or remove it yourself")


@contextmanager
def atomic_folder(folder: str | os.PathLike, ours: Iterable[str] = ()) -> Iterator[Path]:
    """Yield an empty temporary folder beside `folder`; on success it replaces `folder`, which must be
    replaceable (`check_replaceable`: absent, empty, or written by us), checked before and at the swap."""
    final = Path(folder)
    ours = tuple(ours)
    check_replaceable(final, ours)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        (tmp / FOLDER_MARKER).write_text("written by shotdistill: a later write may replace this folder\n")
        check_replaceable(final, ours)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _named(e, final) from e
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
