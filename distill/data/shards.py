"""Prepared shards on disk: `shard-NNNNN.safetensors` + `shard-NNNNN.json`, an index, atomic writes.

A shard holds up to `data.records_per_shard` manifest entries. Its tensors are keyed by the
record's slot in the shard:

    "<slot>/global_text"      [n, D]     real tokens of the global caption
    "<slot>/shot<j>/text"     [n_j, D]   real tokens of shot j's caption
    "<slot>/shot<j>/latents"  [C, F', h, w]  the shot's latents
    "<slot>/shot<j>/frames"   [C, K, h, w]   only when frames are not latents (Wan): the K context
                                             candidates (index.json: settings.context.frames), each
                                             encoded alone as an image

The JSON sidecar (records' metadata, skipped lines, the settings fingerprint) is written after the
tensors and is the shard's commit marker: a shard without it is redone. It also records the tensor
file's size and sha256 (`"file"`): a rerun checks both before reusing a shard (`shard_problem`) and
redoes one that does not match, saying so; a reader checks the size when it opens a shard, and every
read error names the shard file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from student.folder import file_record
from teacher.files import atomic_file, write_atomic

INDEX = "index.json"
REPORT = "report.json"


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def write_json(path: Path, data: object) -> None:
    """JSON written to a temporary name and renamed into place."""
    write_atomic(path, json.dumps(data, indent=1) + "\n")


def read_json(path: Path) -> dict | None:
    """The JSON at `path`, or None when it does not exist."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg}); delete it to redo the shard") from None


class ShardError(RuntimeError):
    """A shard file that is missing, damaged or unreadable; the message names the file."""


def write_shard(folder: Path, name: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Tensors (if any) then the sidecar (with the tensor file's size and sha256), each atomically;
    leftovers of an interrupted try are removed."""
    for stale in folder.glob(f".{name}.*.tmp-*"):
        stale.unlink(missing_ok=True)
    path = folder / f"{name}.safetensors"
    if tensors:
        with atomic_file(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "shotdistill"})
        meta = {**meta, "file": file_record(path)}
    else:
        path.unlink(missing_ok=True)  # an older attempt's tensors: this shard has none
    write_json(folder / f"{name}.json", meta)


def shard_problem(folder: Path, name: str, meta: dict) -> str | None:
    """Why the committed shard `name` (sidecar `meta`) cannot be reused, or None: its tensor file
    is missing or differs from the size and sha256 its sidecar records. A sidecar written before
    files were recorded is checked by opening the file (a torn one fails)."""
    path = Path(folder) / f"{name}.safetensors"
    record = meta.get("file")
    if record is None:
        if not path.is_file():
            return "its tensor file is missing" if _has_tensors(meta) else None
        try:
            safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors' own error type
            return f"its tensor file cannot be read ({e})"
        return None
    if not path.is_file():
        return "its tensor file is missing"
    size = path.stat().st_size
    if size != record["size"]:
        return f"{path.name} has {size} bytes, its sidecar records {record['size']}"
    if file_record(path)["sha256"] != record["sha256"]:
        return f"{path.name} differs from the sha256 its sidecar records"
    return None


def _has_tensors(meta: dict) -> bool:
    """Whether an older sidecar (no "file" record) describes a shard that has tensors."""
    return bool(meta.get("records") or meta.get("pairs"))


class ShardReader:
    """Lazy read access to the tensors of a prepared folder's shards (one open handle per shard)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._open: dict[str, object] = {}

    def get(self, shard: str, key: str) -> torch.Tensor:
        handle = self._open.get(shard)
        path = self.folder / f"{shard}.safetensors"
        if handle is None:
            handle = self._open[shard] = self._open_shard(shard, path)
        if key not in handle.keys():
            raise KeyError(f"{path}: no tensor {key!r}")
        try:
            return handle.get_tensor(key)
        except Exception as e:  # safetensors raises its own error type
            raise ShardError(f"{path}: tensor {key!r} cannot be read ({e}); prepare the data again "
                             "(a rerun redoes damaged shards)") from None

    def _open_shard(self, shard: str, path: Path):
        """The shard's handle, after checking its size against the sidecar's record."""
        if not path.is_file():
            raise ShardError(f"{path}: shard not found; prepare the data again")
        record = (read_json(self.folder / f"{shard}.json") or {}).get("file")
        if record is not None and path.stat().st_size != record["size"]:
            raise ShardError(f"{path}: {path.stat().st_size} bytes, its sidecar records {record['size']} "
                             "(truncated or replaced); prepare the data again (a rerun redoes damaged shards)")
        try:
            return safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors raises its own error type
            raise ShardError(f"{path}: cannot be read ({e}); prepare the data again "
                             "(a rerun redoes damaged shards)") from None

    def __getstate__(self) -> dict:
        # handles do not pickle; DataLoader workers reopen shards on first use
        return {"folder": self.folder, "_open": {}}
