"""Divergence is caught, not only NaN: a loss or gradient-norm spike against a running median is a
bad step, bad steps are counted within a window (not only in a row), and no checkpoint is saved or
pruned during a bad streak, so the last kept checkpoint holds sane weights."""

from __future__ import annotations

import json

import pytest
import torch

from distill import checkpoint
from distill.logging import read_scalars
from distill.runner import run_recipe
from distill.trainer import TooManyBadSteps
from launch.cli import main


def _weights(folder, model="critic"):
    state = torch.load(folder / model / "state" / "mp_rank_00_model_states.pt", weights_only=True)
    return torch.cat([t.flatten().float() for t in state["module"].values()])


def test_huge_lr_stops_nonzero_and_the_last_kept_checkpoint_is_sane(tmp_path, toy_recipe, monkeypatch,
                                                                   capsys):
    # 10 ordinary steps (checkpoints 4 and 8), then the lr jumps to 1e3: the loss reaches ~1e7
    recipe = toy_recipe(tmp_path, train={"steps": 40},
                        optim={"critic": {"lr": 0.01}, "generator": {"lr": 0.01}})
    monkeypatch.setenv("SHOTDISTILL_TOY_LR_AT", "10:1000")
    assert main(["run", str(recipe)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    ckpts = tmp_path / "runs/toy/toy/checkpoints"
    assert "bad steps in the last" in err, err
    assert "critic/loss=" in err and "over 100x its median" in err, err
    assert err.endswith(f"last committed checkpoint: {ckpts / 'step-000008'}"), err
    assert [s for s, _ in checkpoint.committed(ckpts)] == [4, 8]  # none saved or pruned after
    assert not (tmp_path / "runs/toy/toy/DONE").exists()
    for model in ("critic", "generator"):
        weights = _weights(checkpoint.step_dir(ckpts, 8), model)
        assert torch.isfinite(weights).all() and weights.abs().max() < 5, weights.abs().max()
    losses = read_scalars(tmp_path / "runs/toy/tb/toy", "toy/critic/loss")
    assert max(losses) < 20 and max(losses.values()) > 1e4  # it did diverge, and stopped soon


def test_bad_steps_count_within_a_window_not_only_in_a_row(tmp_path, toy_recipe, monkeypatch):
    recipe = toy_recipe(tmp_path, train={"max_bad_steps": 3, "bad_window": 6})
    monkeypatch.setenv("SHOTDISTILL_TOY_NAN_AT", "1,3,5")  # never two in a row
    with pytest.raises(TooManyBadSteps, match=r"3 bad steps in the last 6 .* at step 6;"):
        run_recipe(recipe)
    bad = read_scalars(tmp_path / "runs/toy/tb/toy", "toy/bad_steps")
    assert [bad[s] for s in range(1, 7)] == [0, 1, 1, 2, 2, 3]


def test_sparse_bad_steps_outside_the_window_do_not_stop(tmp_path, toy_recipe, monkeypatch):
    recipe = toy_recipe(tmp_path, train={"max_bad_steps": 2, "bad_window": 3})
    monkeypatch.setenv("SHOTDISTILL_TOY_NAN_AT", "1,5,9")
    run_recipe(recipe)
    assert json.loads((tmp_path / "runs/toy/toy/DONE").read_text())["metrics"]["bad_steps"] == 3


def test_a_loss_spike_is_a_bad_step_whose_update_is_skipped(tmp_path, toy_recipe, monkeypatch):
    recipe = toy_recipe(tmp_path, train={"steps": 8, "checkpoint_every": 8})
    monkeypatch.setenv("SHOTDISTILL_TOY_SPIKE_AT", "6")
    run_recipe(recipe)
    run = tmp_path / "runs/toy"
    bad = read_scalars(run / "tb/toy", "toy/bad_steps")
    assert [bad[s] for s in range(1, 9)] == [0, 0, 0, 0, 0, 0, 1, 1]
    lr = read_scalars(run / "tb/toy", "toy/critic/loss")
    assert lr[7] > 1e4 and lr[8] < 10  # the spike did not wreck the weights
    assert (run / "toy/DONE").exists()


def test_spike_detection_off(tmp_path, toy_recipe, monkeypatch):
    recipe = toy_recipe(tmp_path, train={"steps": 8, "spike_factor": 0.0})
    monkeypatch.setenv("SHOTDISTILL_TOY_SPIKE_AT", "6")
    run_recipe(recipe)
    bad = read_scalars(tmp_path / "runs/toy/tb/toy", "toy/bad_steps")
    assert bad[8] == 0


def test_a_model_trained_with_spikes_off_is_not_judged(tmp_path, toy_recipe, monkeypatch):
    """DMD's generator surrogate grows from ~0 by design: its model is trained with spikes=False."""
    recipe = toy_recipe(tmp_path, train={"steps": 8})
    monkeypatch.setenv("SHOTDISTILL_TOY_SPIKE_AT", "5")  # both models are due at step 5
    monkeypatch.setenv("SHOTDISTILL_TOY_UNWATCHED", "critic,generator")
    run_recipe(recipe)
    bad = read_scalars(tmp_path / "runs/toy/tb/toy", "toy/bad_steps")
    assert bad[8] == 0

