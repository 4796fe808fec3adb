"""Kill -9 or preemption between checkpoints, then resume=auto: every later loss is bit-identical
to an uninterrupted run's (1 rank, and 2 gloo ranks under ZeRO-2 and ZeRO-3)."""

from __future__ import annotations

import signal

import pytest
import yaml

from conftest import free_port, shotdistill, write_recipe
from distill import checkpoint
from distill.logging import read_scalars
from distill.runner import run_recipe

pytestmark = pytest.mark.slow
TAGS = ("toy/critic/loss", "toy/generator/loss")


def _curves(run) -> dict:
    return {tag: read_scalars(run / "tb" / "toy", tag) for tag in TAGS}


@pytest.fixture(scope="module")
def one_rank_reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ref1")
    recipe = folder / "toy.yaml"
    write_recipe(recipe, {"stage": "toy_stage:ToyStage",
                          "run": {"name": "toy", "out": str(folder / "runs")},
                          "train": {"steps": 12, "checkpoint_every": 4, "micro_batch": 2,
                                    "grad_accum": 2},
                          "logging": {"every": 1, "progress": False}})
    run_recipe(recipe)
    curves = _curves(folder / "runs" / "toy")
    assert sorted(curves[TAGS[0]]) == list(range(1, 13))
    return yaml.safe_load(recipe.read_text()), curves


def _copy_recipe(tmp_path, data):
    data = {**data, "run": {**data["run"], "out": str(tmp_path / "runs")}}
    return write_recipe(tmp_path / "toy.yaml", data)


def test_kill9_then_resume_is_bit_identical(tmp_path, one_rank_reference):
    data, reference = one_rank_reference
    recipe = _copy_recipe(tmp_path, data)
    run = tmp_path / "runs" / "toy"
    killed = shotdistill(["run", str(recipe)], tmp_path, {"SHOTDISTILL_TOY_KILL_AT": "7"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [s for s, _ in checkpoint.committed(run / "toy/checkpoints")] == [4]
    assert max(_curves(run)[TAGS[0]]) == 7  # steps past the checkpoint were logged, then lost
    run_recipe(recipe)
    assert _curves(run) == reference


def test_preemption_signal_checkpoints_and_exits_128_plus_signal(tmp_path, one_rank_reference):
    data, reference = one_rank_reference
    recipe = _copy_recipe(tmp_path, data)
    run = tmp_path / "runs" / "toy"
    stopped = shotdistill(["run", str(recipe)], tmp_path, {"SHOTDISTILL_TOY_SIGNAL_AT": "5"})
    assert stopped.returncode == 128 + signal.SIGUSR1, stopped.stderr[-2000:]  # not 0: the stage did not finish
    assert stopped.stderr.strip().splitlines()[-1] == (
        "shotdistill: stopped by signal at step 6; checkpoint saved, resume=auto continues from it")
    assert [s for s, _ in checkpoint.committed(run / "toy/checkpoints")] == [4, 6]
    assert not (run / "toy/DONE").exists()
    run_recipe(recipe)
    assert _curves(run) == reference


def _launch(recipe, cwd, *extra, env=None, nproc=2):
    return shotdistill(["launch", str(recipe), "--nproc", str(nproc),
                        "--master", f"127.0.0.1:{free_port()}", *extra], cwd, env)


@pytest.mark.parametrize("zero", [2, 3])
def test_two_rank_kill9_then_resume_is_bit_identical(tmp_path, toy_recipe, zero):
    ref_recipe = toy_recipe(tmp_path, "ref", deepspeed={"zero_stage": zero})
    ref = _launch(ref_recipe, tmp_path)
    assert ref.returncode == 0, ref.stderr[-2000:]
    recipe = toy_recipe(tmp_path, "cut", deepspeed={"zero_stage": zero})
    killed = _launch(recipe, tmp_path, env={"SHOTDISTILL_TOY_KILL_AT": "7",
                                            "SHOTDISTILL_TOY_KILL_RANK": "1"})
    assert killed.returncode != 0
    assert [s for s, _ in checkpoint.committed(tmp_path / "runs/cut/toy/checkpoints")] == [4]
    resumed = _launch(recipe, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    reference = _curves(tmp_path / "runs/ref")
    assert sorted(reference[TAGS[0]]) == list(range(1, 13))
    assert _curves(tmp_path / "runs/cut") == reference
