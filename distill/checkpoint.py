"""Checkpoints: `<stage>/checkpoints/step-NNNNNN/` with every engine, every rank's state, `COMMITTED`.

A folder counts only once its `COMMITTED` marker exists; the marker is written by rank 0 after
every rank has finished writing and every file in the folder is fsynced, so a crash mid-write
leaves a folder that resume never picks. The marker lists every file with its size; resume checks
them and falls back, saying so, to the previous committed checkpoint when a file is missing or
truncated. Pruning renames a folder out of the `step-*` namespace before deleting it, so a crash
mid-delete never leaves a half-deleted folder that still counts.
Per rank we keep what DeepSpeed does not: the RNG states (python, numpy, torch, CUDA), the data
position and the trainer's own counters (the `client` dict).

No code runs from a checkpoint file: every file, ours and DeepSpeed's, is read with
`torch.load(weights_only=True)` (tensors, plain containers and numbers; DeepSpeed's files also
need four of its own plain classes, allow-listed in `DEEPSPEED_GLOBALS`). Anything else in a file
stops the load with one line naming the file and the type it holds.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.distributed import DistEnv, barrier
from teacher.files import _fsync, write_atomic  # _fsync: the one fsync of a path

MARKER = "COMMITTED"
_STEP = re.compile(r"^step-(\d{6,})$")
_ENGINE_TAG = "state"
_DISCARDED = ".discard-"  # `.step-NNNNNN.discard-<pid>`: a folder being deleted, never a step


class CheckpointError(RuntimeError):
    """A committed checkpoint that cannot be used; the message names the folder or file."""


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def _steps(root: Path) -> list[tuple[int, Path]]:
    if not Path(root).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(root).iterdir() if (m := _STEP.match(p.name))]
    return sorted(found)


def committed(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every committed checkpoint, oldest first."""
    return [(s, p) for s, p in _steps(root) if (p / MARKER).is_file()]


def read_marker(folder: Path) -> dict:
    """The COMMITTED marker's JSON ({} for an empty or unreadable marker)."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def problem(folder: Path, world_size: int) -> str | None:
    """Why the committed checkpoint `folder` cannot be loaded by `world_size` ranks, or None.

    Checks every file the marker lists (present, same size) and that a state exists per rank."""
    folder = Path(folder)
    files = read_marker(folder).get("files")
    if isinstance(files, dict):
        for rel, size in sorted(files.items()):
            path = folder / rel
            if not path.is_file():
                return f"{rel} is missing"
            if path.stat().st_size != size:
                return f"{rel} is truncated or changed ({path.stat().st_size} bytes, {size} written)"
    for rank in range(world_size):
        if not _rank_file(folder, rank).is_file():
            return (f"no state for rank {rank} (saved with another world size? convert it with "
                    "DeepSpeed's universal checkpoint)")
    return None


def candidates(resume: str, root: Path, world_size: int) -> tuple[list[Path], list[str]]:
    """The checkpoint folders `resume` (auto | never | a folder) may restore, best first, and one
    note per committed checkpoint passed over. An explicit folder is the only candidate and must be
    intact (CheckpointError otherwise); `auto` falls back through older committed checkpoints."""
    if resume == "never":
        return [], []
    if resume != "auto":
        path = resolve_resume(resume, root)
        why = problem(path, world_size)
        if why:
            raise CheckpointError(f"checkpoint {path} is unusable: {why}")
        return [path], []
    usable, notes = [], []
    for _, path in reversed(committed(root)):
        why = problem(path, world_size)
        if why:
            notes.append(f"checkpoint {path} is unusable: {why}; passing over it")
        else:
            usable.append(path)
    return usable, notes


def resolve_resume(resume: str, root: Path) -> Path | None:
    """The checkpoint folder `resume` (auto | never | a folder) selects, or None to start fresh."""
    if resume == "never":
        return None
    if resume == "auto":
        done = committed(root)
        return done[-1][1] if done else None
    path = Path(resume)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"resume={resume}: not a committed checkpoint (no {MARKER} marker)")
    return path


def capture_rng() -> dict[str, Any]:
    """Every RNG state as tensors, numbers and strings only (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy = state["numpy"]
    if isinstance(numpy, dict):
        numpy = (numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                 numpy["has_gauss"], numpy["cached_gaussian"])
    np.random.set_state(numpy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _deepspeed_globals() -> list:
    """The plain classes DeepSpeed's engine and ZeRO optimizer files hold besides tensors: loss
    scalers (attributes only), the ZeRO stage enum and fp32 fragment addresses (a dataclass)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _numpy_arrays() -> list:
    """numpy's array reconstruction: only for rank states written before RNG states were tensors."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), _reconstruct]


_TORCH_LOAD = torch.load  # the real one, while `_deepspeed_loads_safely` stands in for it


def safe_load(path: str | os.PathLike, map_location=None, extra_globals: list | None = None) -> Any:
    """torch.load that runs no code from the file; CheckpointError (one line naming the file) for
    a file that holds anything else or cannot be read."""
    try:
        with torch.serialization.safe_globals(_numpy_arrays() + list(extra_globals or [])):
            return _TORCH_LOAD(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        held = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(e))
        what = f"it holds {held.group(1)}" if held else "it holds more than tensors"
        raise CheckpointError(f"{path}: refused to load: {what} (checkpoint files may hold only "
                              "tensors and plain data)") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as e:  # a torn zip, a short read
        raise CheckpointError(f"{path}: cannot be read ({_first_line(e)})") from None


@contextmanager
def _deepspeed_loads_safely():
    """Inside the block, every torch.load (DeepSpeed's engine load calls it with weights_only=False)
    is `safe_load` with DeepSpeed's plain classes allowed."""
    allowed = _deepspeed_globals()

    def load(f, map_location=None, *args, **kwargs):
        return safe_load(f, map_location, allowed)

    torch.load = load
    try:
        yield
    finally:
        torch.load = _TORCH_LOAD


def _rank_file(folder: Path, rank: int) -> Path:
    return folder / f"rank-{rank:05d}.pt"


def _sync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder` (DeepSpeed's torch.save does not). Another
    rank's temporary file may be renamed meanwhile: a path that vanished is its writer's to sync."""
    paths = sorted(folder.rglob("*"), key=lambda p: (p.is_dir(), -len(p.parts)))
    for path in [*paths, folder]:
        try:
            _fsync(path)
        except FileNotFoundError:
            pass


def _inventory(folder: Path) -> dict[str, int]:
    """{relative path: size} of every file in a checkpoint folder but the marker."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MARKER}


def discard(path: Path) -> None:
    """Delete a checkpoint folder: first renamed out of the step-* namespace (one atomic step), so
    a crash mid-delete leaves a hidden leftover that the next prune removes, never a half-deleted
    folder that still holds COMMITTED."""
    path = Path(path)
    if not path.exists():
        return
    gone = path.with_name(f".{path.name}{_DISCARDED}{os.getpid()}")
    shutil.rmtree(gone, ignore_errors=True)
    path.rename(gone)
    _fsync(path.parent)
    shutil.rmtree(gone, ignore_errors=True)


def save(folder: Path, engines: dict, client: dict[str, Any], env: DistEnv,
         fingerprint: dict | None = None) -> None:
    """Collective: write every engine's state and this rank's state, fsync them, then commit
    (rank 0: a marker that lists every file and its size)."""
    folder = Path(folder)
    if env.is_main and folder.exists():
        discard(folder)  # a leftover of a crash mid-write: never mix two attempts
    barrier()
    folder.mkdir(parents=True, exist_ok=True)
    for name, engine in engines.items():
        engine.save_checkpoint(str(folder / name), tag=_ENGINE_TAG, client_state={},
                               save_latest=False)
    buf = io.BytesIO()
    torch.save({"rng": capture_rng(), "world_size": env.world_size, **client}, buf)
    write_atomic(_rank_file(folder, env.rank), buf.getvalue())
    _sync_tree(folder)  # this rank's files are on disk before the marker can say they are
    barrier()
    if env.is_main:
        marker = {"step": client.get("step"), "files": _inventory(folder)}
        if fingerprint is not None:  # the keys that made it (distill/keys.py), checked on resume
            marker["fingerprint"] = fingerprint
        write_atomic(folder / MARKER, json.dumps(marker) + "\n")
        _fsync(folder)
    barrier()


def load_state(folder: Path, env: DistEnv) -> dict[str, Any]:
    """This rank's own state (RNG, counters, data position) from `folder`, without touching any
    engine; CheckpointError naming the file when it is missing, unreadable or from another world."""
    folder = Path(folder)
    path = _rank_file(folder, env.rank)
    if not path.is_file():
        raise CheckpointError(f"{folder}: no state for rank {env.rank} (saved with another world "
                              "size? convert it with DeepSpeed's universal checkpoint)")
    state = safe_load(path)
    if not isinstance(state, dict) or "world_size" not in state:
        raise CheckpointError(f"{path}: not a rank state written by this trainer")
    if state["world_size"] != env.world_size:
        raise CheckpointError(f"{folder}: saved with world size {state['world_size']}, "
                              f"now {env.world_size}")
    return state


def load_engines(folder: Path, engines: dict) -> None:
    """Collective: restore every engine from `folder`; CheckpointError naming what failed."""
    folder = Path(folder)
    for name, engine in engines.items():
        try:
            with _deepspeed_loads_safely():
                load_path, _ = engine.load_checkpoint(str(folder / name), tag=_ENGINE_TAG,
                                                      load_lr_scheduler_states=False)
        except CheckpointError:
            raise
        except Exception as e:  # DeepSpeed asserts, torch's zip reader, a missing file
            raise CheckpointError(f"{folder / name}: DeepSpeed could not load engine '{name}' "
                                  f"({type(e).__name__}: {_first_line(e)})") from None
        if load_path is None:
            raise CheckpointError(f"{folder / name}: DeepSpeed could not load engine '{name}'")


def load(folder: Path, engines: dict, env: DistEnv) -> dict[str, Any]:
    """Collective: restore every engine and this rank's RNG; return this rank's client dict."""
    state = load_state(folder, env)
    load_engines(folder, engines)
    restore_rng(state.pop("rng"))
    return state


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def prune(root: Path, keep: int, resumed_from: int | None = None) -> None:
    """Rank 0: keep the newest `keep` committed steps; drop uncommitted folders older than the
    newest commit and, after a resume, every folder past the resume point (stale)."""
    done = committed(root)
    newest = done[-1][0] if done else -1
    for step, path in done[:-keep]:
        discard(path)
    for step, path in _steps(root):
        stale = resumed_from is not None and step > resumed_from
        if stale or (step < newest and not (path / MARKER).is_file()):
            discard(path)
    for leftover in Path(root).glob(f".step-*{_DISCARDED}*"):  # a crash mid-delete
        shutil.rmtree(leftover, ignore_errors=True)


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (all devices) alike."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
