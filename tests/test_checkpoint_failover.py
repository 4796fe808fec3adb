"""Checkpoints that fail over: a committed checkpoint with a truncated or deleted file is named and
passed over for the previous one; the marker lists every file and comes after they are fsynced;
pruning never leaves a half-deleted folder that still counts as committed."""

from __future__ import annotations

import os
import shutil

import pytest

from distill import checkpoint
from distill.logging import read_scalars
from distill.runner import run_recipe


def _losses(run):
    return read_scalars(run / "tb" / "toy", "toy/critic/loss")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The critic losses of an uninterrupted 16-step toy run."""
    from conftest import write_recipe
    folder = tmp_path_factory.mktemp("reference")
    run_recipe(write_recipe(folder / "toy.yaml", {
        "stage": "toy_stage:ToyStage", "run": {"name": "toy", "out": str(folder / "runs")},
        "train": {"steps": 16, "checkpoint_every": 4, "micro_batch": 2, "grad_accum": 2},
        "deepspeed": {"zero_stage": 2, "param_persistence_threshold": 0},
        "logging": {"every": 1, "progress": False}}))
    return _losses(folder / "runs" / "toy")


@pytest.fixture
def finished(tmp_path, toy_recipe, reference):
    """A 12-step toy run (checkpoints 8 and 12 kept), not marked DONE, and the reference losses."""
    recipe = toy_recipe(tmp_path)
    run_recipe(recipe)
    run = tmp_path / "runs" / "toy"
    (run / "toy" / "DONE").unlink()
    return recipe, run, reference


def _continue(recipe, run, capfd):
    run_recipe(recipe, ["train.steps=16"])
    return capfd.readouterr().err


@pytest.mark.parametrize("damage", ["truncate-engine", "delete-engine", "delete-rank", "torn-rank"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(finished, capfd, damage):
    recipe, run, reference = finished
    ckpts = run / "toy" / "checkpoints"
    newest = checkpoint.step_dir(ckpts, 12)
    engine = next((newest / "critic").rglob("*optim_states.pt"))
    rank = newest / "rank-00000.pt"
    if damage == "truncate-engine":
        engine.write_bytes(engine.read_bytes()[:100])
    elif damage == "delete-engine":
        engine.unlink()
    elif damage == "delete-rank":
        rank.unlink()
    else:  # same size, garbage inside: only loading can tell
        rank.write_bytes(b"\0" * rank.stat().st_size)
    err = _continue(recipe, run, capfd)
    assert f"checkpoint {newest} is unusable" in err, err
    assert f"resuming from {checkpoint.step_dir(ckpts, 8)}" in err, err
    assert _losses(run) == reference  # steps 9..16 redone, bit-identical
    assert [s for s, _ in checkpoint.committed(ckpts)] == [12, 16]


def test_no_usable_checkpoint_stops_naming_each(finished, capfd):
    recipe, run, _ = finished
    ckpts = run / "toy" / "checkpoints"
    for step in (8, 12):
        (checkpoint.step_dir(ckpts, step) / "rank-00000.pt").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="no usable committed checkpoint"):
        run_recipe(recipe, ["train.steps=16"])
    err = capfd.readouterr().err
    assert all(f"checkpoint {checkpoint.step_dir(ckpts, s)} is unusable" in err for s in (8, 12))
    assert [s for s, _ in checkpoint.committed(ckpts)] == [8, 12]  # nothing deleted


def test_explicit_resume_of_a_damaged_checkpoint_names_it(finished):
    recipe, run, _ = finished
    folder = checkpoint.step_dir(run / "toy" / "checkpoints", 12)
    (folder / "generator" / "state").rename(folder / "generator" / "moved")
    with pytest.raises(checkpoint.CheckpointError, match=f"checkpoint {folder} is unusable: "
                       "generator/state/.* is missing"):
        run_recipe(recipe, ["train.steps=16", f"resume={folder}"])


def test_marker_comes_after_every_file_is_fsynced(tmp_path, toy_recipe, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    run_recipe(toy_recipe(tmp_path, train={"steps": 4}))
    folder = checkpoint.step_dir(tmp_path / "runs/toy/toy/checkpoints", 4)
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.name != checkpoint.MARKER)
    assert len(files) >= 5  # two engines (model + optimizer states) and a rank state
    marker = next(i for i, p in enumerate(synced) if p.endswith(f"/.{checkpoint.MARKER}.tmp-{os.getpid()}"))
    assert set(files) <= set(synced[:marker]), set(files) - set(synced[:marker])
    listed = checkpoint.read_marker(folder)["files"]
    assert sorted(str(folder / rel) for rel in listed) == files


def test_prune_crash_mid_delete_leaves_no_committed_half_folder(tmp_path, toy_recipe, monkeypatch):
    recipe = toy_recipe(tmp_path, train={"steps": 8})
    run_recipe(recipe)
    ckpts = tmp_path / "runs/toy/toy/checkpoints"
    shutil.copytree(checkpoint.step_dir(ckpts, 8), checkpoint.step_dir(ckpts, 12))
    real = shutil.rmtree

    def killed_midway(path, *args, **kwargs):  # deletes the states, then the process "dies"
        if not os.path.exists(path):
            return
        for state in sorted(os.scandir(path), key=lambda e: e.name):
            if state.name.startswith("rank-"):
                os.unlink(state.path)
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.prune(ckpts, keep=2)
    monkeypatch.setattr(shutil, "rmtree", real)
    for step, folder in checkpoint.committed(ckpts):  # every folder that counts is whole
        assert (folder / "rank-00000.pt").is_file(), step
    assert [s for s, _ in checkpoint.committed(ckpts)] == [8, 12]
    checkpoint.prune(ckpts, keep=2)  # the next prune removes the leftover
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000008", "step-000012"]
