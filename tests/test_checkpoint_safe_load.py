"""No code runs from a checkpoint file: a pickle payload planted in a rank state or in one of
DeepSpeed's engine files does not run, and the load stops with one line naming the file."""

from __future__ import annotations

import json
import os

import pytest
import torch

from distill import checkpoint
from distill.runner import run_recipe


class _Payload:
    """Unpickling this runs `touch <path>` (what an attacker's file would do)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _plant(path, side_effect):
    """Replace the file with a payload-carrying one and update the marker's size record, as an
    attacker with write access to the run folder would."""
    torch.save({"world_size": 1, "step": 12, "payload": _Payload(side_effect)}, path)
    folder = next(p for p in path.parents if p.name.startswith("step-"))
    marker = json.loads((folder / checkpoint.MARKER).read_text())
    if "files" in marker:
        marker["files"][path.relative_to(folder).as_posix()] = path.stat().st_size
    (folder / checkpoint.MARKER).write_text(json.dumps(marker))


@pytest.fixture
def finished(tmp_path, toy_recipe):
    recipe = toy_recipe(tmp_path)
    run_recipe(recipe)
    run = tmp_path / "runs" / "toy"
    (run / "toy" / "DONE").unlink()
    return recipe, checkpoint.step_dir(run / "toy" / "checkpoints", 12)


@pytest.mark.parametrize("target", ["rank-00000.pt", "critic/state/mp_rank_00_model_states.pt",
                                    "generator/state/zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_planted_payload_does_not_run(finished, tmp_path, target):
    recipe, folder = finished
    side_effect = tmp_path / "pwned"
    path = folder / target
    _plant(path, side_effect)
    with pytest.raises(Exception) as error:
        run_recipe(recipe, ["train.steps=16", f"resume={folder}"])
    assert not side_effect.exists(), "the planted payload ran"
    assert error.type is checkpoint.CheckpointError, error.value
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "refused to load" in message, message
    assert "posix.system" in message or "os.system" in message, message


def test_rank_states_load_without_unpickling(finished):
    _, folder = finished
    state = torch.load(folder / "rank-00000.pt", weights_only=True)  # no allow-list needed
    assert state["step"] == 12 and isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)


def test_rng_round_trip():
    import random

    import numpy as np
    state = checkpoint.capture_rng()
    drawn = (random.random(), float(np.random.rand()), float(torch.rand(())))
    checkpoint.restore_rng(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == drawn
