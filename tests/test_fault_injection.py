"""Fault injection: a toy stage SIGKILLed at random moments (a step starting, between two engines'
updates, mid-way through DeepSpeed's engine files, our state file or the COMMITTED marker, in an
fsync, right after a commit, in the middle of pruning), 20 attempts, some killed again while
resuming. After every kill each folder that counts as committed is whole, and every resume reaches
exactly the losses of an uninterrupted run.

The test starts one clean Python process (no process group, no threads of earlier tests: forking
those hangs) that imports everything once and runs each attempt as a forked child of itself, so 20
attempts take under a minute on 2 cores; a child kills itself with SIGKILL at its chosen event."""

from __future__ import annotations

import io
import os
import random
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import subprocess_env, write_recipe
from distill import checkpoint
from distill.logging import read_scalars

pytestmark = pytest.mark.slow

TAGS = ("toy/critic/loss", "toy/generator/loss")
ATTEMPTS = 20
STEPS = 12
# event -> how many of them an uninterrupted 12-step run has (checkpoints every 2 steps, keep 2)
EVENTS = {"step": 12, "update": 15, "engine-write": 24, "state-write": 12, "fsync": 94,
          "committed": 6, "prune": 4}


def _recipe(folder: Path) -> Path:
    return write_recipe(folder / "toy.yaml", {
        "stage": "toy_stage:ToyStage", "run": {"name": "toy", "out": str(folder / "runs")},
        "train": {"steps": STEPS, "checkpoint_every": 2, "keep_checkpoints": 2, "micro_batch": 2,
                  "grad_accum": 2},
        "deepspeed": {"zero_stage": 2}, "logging": {"every": 1, "progress": False}})


def _curves(folder: Path) -> dict:
    return {tag: read_scalars(folder / "runs/toy/tb/toy", tag) for tag in TAGS}


def _inject(kind: str, at: int) -> None:
    """In the child: SIGKILL this process at the `at`-th event of `kind`."""
    from distill import trainer

    seen = Counter()

    def due(event: str) -> bool:
        seen[event] += 1
        return event == kind and seen[event] == at

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    train_step, update = trainer.Trainer.train_step, trainer.Trainer._update

    def step(self):
        if due("step"):
            die()
        return train_step(self)

    def one_update(self, name, bad):
        out = update(self, name, bad)
        if due("update"):  # this engine stepped, the next one has not
            die()
        return out

    real_save = torch.save

    def save(obj, f, *args, **kwargs):  # DeepSpeed's engine files (ours go through BytesIO)
        if isinstance(f, (str, os.PathLike)) and due("engine-write"):
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            Path(f).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # torn
            die()
        return real_save(obj, f, *args, **kwargs)

    write_atomic = checkpoint.write_atomic

    def write(path, data):
        if due("state-write"):  # half of the temporary file, never renamed
            from teacher.files import temp_path
            raw = data.encode() if isinstance(data, str) else data
            temp_path(path).write_bytes(raw[: len(raw) // 2])
            die()
        write_atomic(path, data)
        if Path(path).name == checkpoint.MARKER and due("committed"):
            die()

    fsync = getattr(checkpoint, "_fsync", None)

    def sync(path):
        if due("fsync"):
            die()
        fsync(path)

    rmtree = shutil.rmtree

    def remove(path, *args, **kwargs):
        if Path(path).parent.name == "checkpoints" and os.path.isdir(path) and due("prune"):
            files = sorted((p for p in Path(path).rglob("*") if p.is_file()), reverse=True)
            for entry in files[:3]:  # part of the folder deleted, then the process dies
                entry.unlink()
            die()
        return rmtree(path, *args, **kwargs)

    trainer.Trainer.train_step, trainer.Trainer._update = step, one_update
    torch.save, checkpoint.write_atomic, shutil.rmtree = save, write, remove
    if fsync is not None:
        checkpoint._fsync = sync


def _warm_imports() -> None:
    """What every run would import lazily (DeepSpeed, and the torch.compile machinery its optimizer
    check pulls in), imported once here so that the forked children start warm."""
    import importlib

    for name in ("deepspeed", "torch._dynamo", "torch._inductor.compile_fx",
                 "deepspeed.runtime.zero.muon.muon_optimizer", "distill.runner", "toy_stage"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def _run(recipe: Path, fault: tuple[str, int] | None = None) -> int:
    """Run the recipe in a forked child; its wait status (0: finished, -9: SIGKILLed)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            torch.set_num_threads(1)
            if fault:
                _inject(*fault)
            from distill.runner import run_recipe
            import contextlib
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                run_recipe(recipe)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _committed_are_whole(folder: Path) -> None:
    """Every folder that counts as committed holds a rank state and both engines' files, each of
    the size the marker records."""
    ckpts = folder / "runs/toy/toy/checkpoints"
    for step, path in checkpoint.committed(ckpts):
        assert (path / "rank-00000.pt").is_file(), step
        for engine in ("critic", "generator"):
            assert len(list((path / engine).rglob("*.pt"))) == 2, (step, engine)
        for rel, size in checkpoint.read_marker(path).get("files", {}).items() \
                if hasattr(checkpoint, "read_marker") else ():
            assert (path / rel).stat().st_size == size, (step, rel)


def test_random_sigkills_then_resume_reach_the_uninterrupted_losses(tmp_path):
    done = subprocess.run([sys.executable, __file__, str(tmp_path)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    assert "20 attempts" in done.stdout, done.stdout[-2000:]


def main(tmp_path: Path) -> None:
    """The attempts, in this clean process (see the module doc)."""
    _warm_imports()
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    assert _run(_recipe(reference_dir)) == 0
    reference = _curves(reference_dir)
    assert sorted(reference[TAGS[0]]) == list(range(1, STEPS + 1))

    rng = random.Random(16)
    kinds = sorted(EVENTS)
    seen_kinds = Counter()
    for attempt in range(ATTEMPTS):
        folder = tmp_path / f"attempt-{attempt:02d}"
        folder.mkdir()
        recipe = _recipe(folder)
        faults = [(kind := kinds[attempt % len(kinds)], rng.randint(1, EVENTS[kind]))]
        if rng.random() < 0.5:  # killed again while resuming
            again = rng.choice(kinds)
            faults.append((again, rng.randint(1, EVENTS[again])))
        for fault in faults:
            status = _run(recipe, fault)
            assert status in (0, -signal.SIGKILL), (attempt, fault, status)
            seen_kinds[fault[0]] += status == -signal.SIGKILL
            _committed_are_whole(folder)
        assert _run(recipe) == 0, (attempt, faults)
        assert (folder / "runs/toy/toy/DONE").is_file()
        assert _curves(folder) == reference, (attempt, faults)
        _committed_are_whole(folder)
        shutil.rmtree(folder)
    assert set(seen_kinds) == set(kinds) and all(seen_kinds.values()), seen_kinds
    print(f"{ATTEMPTS} attempts, kills per event: {dict(sorted(seen_kinds.items()))}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
