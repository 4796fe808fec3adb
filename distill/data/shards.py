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
tensors and is the shard's commit marker: a shard without it is redone, one with it is never redone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

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


def write_shard(folder: Path, name: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Tensors (if any) then the sidecar, each atomically; leftovers of an interrupted try are removed."""
    for stale in folder.glob(f".{name}.*.tmp-*"):
        stale.unlink(missing_ok=True)
    if tensors:
        with atomic_file(folder / f"{name}.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "shotdistill"})
    write_json(folder / f"{name}.json", meta)


class ShardReader:
    """Lazy read access to the tensors of a prepared folder's shards (one open handle per shard)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._open: dict[str, object] = {}

    def get(self, shard: str, key: str) -> torch.Tensor:
        handle = self._open.get(shard)
        if handle is None:
            path = self.folder / f"{shard}.safetensors"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: shard not found")
            handle = self._open[shard] = safe_open(str(path), framework="pt")
        try:
            return handle.get_tensor(key)
        except Exception:  # safetensors raises its own error type for a missing key
            raise KeyError(f"{self.folder / shard}.safetensors: no tensor {key!r}") from None

    def __getstate__(self) -> dict:
        # handles do not pickle; DataLoader workers reopen shards on first use
        return {"folder": self.folder, "_open": {}}
