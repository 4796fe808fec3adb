"""Shared test helpers: a toy-stage recipe writer and a `shotdistill` subprocess runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

# kernels: Triton reads TRITON_INTERPRET when kernels (its own included) are decorated, i.e. at
# import, so it is set here before any test imports triton; without CUDA the kernel tests run
# through the interpreter (test_kernels_triton.py skips unless it is set).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
_RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def shotdistill(args: list[str], cwd: Path, extra_env: dict | None = None,
                timeout: float = 240) -> subprocess.CompletedProcess:
    """Run `python -m launch.cli ARGS` with tests/ importable (for the toy stage)."""
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=cwd,
                          env=subprocess_env(extra_env), capture_output=True, text=True,
                          timeout=timeout)


def subprocess_env(extra_env: dict | None = None) -> dict:
    """Our environment minus any rendezvous variables, with tests/ on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
    env.update(extra_env or {})
    return env


@pytest.fixture
def one_thread():
    """Tiny ops: one thread avoids OpenMP spin-waiting on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def toy_recipe():
    """toy_recipe(folder, name, **sections): a 12-step toy recipe writing runs under `folder`."""
    def make(folder: Path, name: str = "toy", **sections) -> Path:
        data = {"stage": "toy_stage:ToyStage",
                "run": {"name": name, "out": str(folder / "runs"), "dist_timeout": 60},
                "train": {"steps": 12, "checkpoint_every": 4, "micro_batch": 2, "grad_accum": 2},
                "deepspeed": {"zero_stage": 2, "param_persistence_threshold": 0},
                "logging": {"every": 1, "progress": False}}
        for section, values in sections.items():
            data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
        return write_recipe(folder / f"{name}.yaml", data)
    return make


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
