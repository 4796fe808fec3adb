"""Checkpoints: `<stage>/checkpoints/step-NNNNNN/` with every engine, every rank's state, `COMMITTED`.

A folder counts only once its `COMMITTED` marker exists; the marker is written by rank 0 after
every rank has finished writing, so a crash mid-write leaves a folder that resume never picks.
Per rank we keep what DeepSpeed does not: the RNG states (python, numpy, torch, CUDA), the data
position and the trainer's own counters (the `client` dict).
"""

from __future__ import annotations

import io
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.distributed import DistEnv, barrier
from teacher.files import write_atomic

MARKER = "COMMITTED"
_STEP = re.compile(r"^step-(\d{6,})$")
_ENGINE_TAG = "state"


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
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank_file(folder: Path, rank: int) -> Path:
    return folder / f"rank-{rank:05d}.pt"


def save(folder: Path, engines: dict, client: dict[str, Any], env: DistEnv) -> None:
    """Collective: write every engine's state and this rank's state, then commit (rank 0)."""
    folder = Path(folder)
    if env.is_main and folder.exists():
        shutil.rmtree(folder)  # a leftover of a crash mid-write: never mix two attempts
    barrier()
    folder.mkdir(parents=True, exist_ok=True)
    for name, engine in engines.items():
        engine.save_checkpoint(str(folder / name), tag=_ENGINE_TAG, client_state={},
                               save_latest=False)
    buf = io.BytesIO()
    torch.save({"rng": capture_rng(), "world_size": env.world_size, **client}, buf)
    write_atomic(_rank_file(folder, env.rank), buf.getvalue())
    barrier()
    if env.is_main:
        write_atomic(folder / MARKER, json.dumps({"step": client.get("step")}) + "\n")
    barrier()


def load(folder: Path, engines: dict, env: DistEnv) -> dict[str, Any]:
    """Collective: restore every engine and this rank's RNG; return this rank's client dict."""
    folder = Path(folder)
    path = _rank_file(folder, env.rank)
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no state for rank {env.rank} (saved with another "
                                "world size? convert it with DeepSpeed's universal checkpoint)")
    state = torch.load(path, weights_only=False)
    if state["world_size"] != env.world_size:
        raise ValueError(f"{folder}: saved with world size {state['world_size']}, "
                         f"now {env.world_size}")
    for name, engine in engines.items():
        load_path, _ = engine.load_checkpoint(str(folder / name), tag=_ENGINE_TAG,
                                              load_lr_scheduler_states=False)
        if load_path is None:
            raise FileNotFoundError(f"{folder / name}: DeepSpeed could not load engine '{name}'")
    restore_rng(state.pop("rng"))
    return state


def prune(root: Path, keep: int, resumed_from: int | None = None) -> None:
    """Rank 0: keep the newest `keep` committed steps; drop uncommitted folders older than the
    newest commit and, after a resume, every folder past the resume point (stale)."""
    done = committed(root)
    newest = done[-1][0] if done else -1
    for step, path in done[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    for step, path in _steps(root):
        stale = resumed_from is not None and step > resumed_from
        if stale or (step < newest and not (path / MARKER).is_file()):
            shutil.rmtree(path, ignore_errors=True)


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (all devices) alike."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
