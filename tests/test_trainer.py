"""The trainer substrate in one process: run folder, two engines at two rates, accumulation,
warmup, NaN skipping, max_bad_steps, keep_checkpoints and COMMITTED-only resume."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch
import yaml

from distill import checkpoint
from distill.distributed import init_distributed
from distill.logging import read_scalars
from distill.runner import run_recipe
from distill.stages.base import StageContext
from distill.trainer import TooManyBadSteps, TrainedModel, Trainer
from conftest import write_recipe
from launch.cli import main


def _losses(run, name="critic"):
    return read_scalars(run / "tb" / "toy", f"toy/{name}/loss")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One 12-step toy run (ZeRO-2, grad_accum 2, critic warmup 4), shared by several tests."""
    folder = tmp_path_factory.mktemp("finished")
    recipe = write_recipe(folder / "toy.yaml", {
        "stage": "toy_stage:ToyStage", "run": {"name": "toy", "out": str(folder / "runs")},
        "train": {"steps": 12, "checkpoint_every": 4, "micro_batch": 2, "grad_accum": 2},
        "optim": {"critic": {"warmup": 4, "lr": 0.01}},
        "logging": {"every": 1, "progress": False}})
    summary = run_recipe(recipe)
    return folder / "runs" / "toy", summary


def test_run_folder_layout(finished):
    run, summary = finished
    assert summary["toy"]["status"] == "ran"
    for rel in ["config.yaml", "toy/config.yaml", "toy/deepspeed.critic.json",
                "toy/deepspeed.generator.json", "toy/metrics.json", "toy/DONE"]:
        assert (run / rel).is_file(), rel
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 12
    ds = json.loads((run / "toy/deepspeed.critic.json").read_text())
    assert (ds["gradient_accumulation_steps"], ds["train_micro_batch_size_per_gpu"]) == (2, 2)
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 1.0
    done = json.loads((run / "toy/DONE").read_text())
    assert done["metrics"]["steps"] == 12 and done["wall_s"] > 0
    # keep_checkpoints=2 of 4, 8, 12
    assert [s for s, _ in checkpoint.committed(run / "toy/checkpoints")] == [8, 12]


def test_two_models_two_rates_and_warmup(finished):
    run, _ = finished
    assert sorted(_losses(run, "critic")) == list(range(1, 13))
    assert sorted(_losses(run, "generator")) == [1, 6, 11]  # every fifth step (0, 5, 10)
    lr = read_scalars(run / "tb/toy", "toy/critic/lr")
    assert [lr[s] for s in range(1, 7)] == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])
    for tag in ["critic/grad_norm", "step_time", "samples_per_s", "bad_steps"]:
        assert len(read_scalars(run / "tb/toy", f"toy/{tag}")) == 12, tag


def test_finished_stage_is_not_rerun(finished):
    run, _ = finished
    summary = run_recipe(run.parent.parent / "toy.yaml")
    assert summary["toy"]["status"] == "done earlier"


class _Seq:
    """Deterministic micro-batches of `size` rows from a fixed set, resumable."""

    def __init__(self, size):
        g = torch.Generator().manual_seed(3)
        self.x, self.size, self.pos = torch.randn(64, 3, generator=g), size, 0

    def __next__(self):
        batch = self.x[self.pos:self.pos + self.size]
        self.pos += self.size
        return batch

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


def _weights_after(tmp_path, micro_batch, grad_accum, zero):
    from distill.config import load_recipe
    recipe = write_recipe(tmp_path / f"r{micro_batch}{grad_accum}{zero}.yaml", {
        "stage": "x:Y", "run": {"name": "acc", "out": str(tmp_path)}, "resume": "never",
        "train": {"steps": 3, "micro_batch": micro_batch, "grad_accum": grad_accum},
        "optim": {"critic": {"lr": 0.1, "clip": 0.0}}, "deepspeed": {"zero_stage": zero},
        "logging": {"tensorboard": False, "progress": False}})
    cfg = load_recipe(recipe)
    stage = tmp_path / f"acc{micro_batch}{grad_accum}{zero}"
    stage.mkdir()
    ctx = StageContext(tmp_path, stage, tmp_path / "tb", init_distributed(60), recipe)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    target = torch.tensor([[1.0], [-2.0], [0.5]])
    trainer = None

    def step(batch, due, step):
        return {"critic": ((trainer.engines["critic"](batch) - batch @ target) ** 2).mean()}

    trainer = Trainer(cfg, ctx, [TrainedModel("critic", model)], _Seq(micro_batch), step)
    trainer.fit()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("zero", [0, 2])
def test_gradient_accumulation_really_accumulates(tmp_path, zero):
    big = _weights_after(tmp_path, 4, 1, zero)
    accumulated = _weights_after(tmp_path, 2, 2, zero)
    small = _weights_after(tmp_path, 2, 1, zero)
    torch.testing.assert_close(accumulated, big, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(small, big, atol=1e-4)


def test_nan_steps_are_skipped_and_counted(tmp_path, toy_recipe, monkeypatch):
    monkeypatch.setenv("SHOTDISTILL_TOY_NAN_AT", "2,5")
    run_recipe(toy_recipe(tmp_path))
    run = tmp_path / "runs" / "toy"
    bad = read_scalars(run / "tb/toy", "toy/bad_steps")
    assert [bad[s] for s in range(1, 13)] == [0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2]
    losses = _losses(run)
    assert all(torch.isfinite(torch.tensor(v)) for s, v in losses.items() if s not in (3, 6))
    assert json.loads((run / "toy/DONE").read_text())["metrics"]["bad_steps"] == 2


@pytest.mark.parametrize("zero", [0, 2])
def test_nonfinite_gradient_with_finite_loss_is_skipped(tmp_path, toy_recipe, monkeypatch, zero):
    monkeypatch.setenv("SHOTDISTILL_TOY_BAD_GRAD_AT", "3")
    run_recipe(toy_recipe(tmp_path, deepspeed={"zero_stage": zero}, train={"steps": 6}))
    run = tmp_path / "runs" / "toy"
    assert torch.isfinite(torch.tensor(_losses(run)[4]))  # the loss itself was finite
    assert not torch.isfinite(torch.tensor(read_scalars(run / "tb/toy", "toy/critic/grad_norm")[4]))
    bad = read_scalars(run / "tb/toy", "toy/bad_steps")
    assert [bad[s] for s in range(1, 7)] == [0, 0, 0, 1, 1, 1]
    assert all(torch.isfinite(torch.tensor(v)) for v in _losses(run).values())


def test_max_bad_steps_aborts_and_keeps_last_checkpoint(tmp_path, toy_recipe, monkeypatch, capsys):
    recipe = toy_recipe(tmp_path, train={"max_bad_steps": 3})
    monkeypatch.setenv("SHOTDISTILL_TOY_NAN_AT", "5,6,7")
    with pytest.raises(TooManyBadSteps, match="3 bad steps in the last 8 "):
        run_recipe(recipe)
    ckpts = tmp_path / "runs/toy/toy/checkpoints"
    assert [s for s, _ in checkpoint.committed(ckpts)] == [4]
    assert main(["run", str(recipe)]) == 1
    assert capsys.readouterr().err.strip().endswith(
        f"at step 8; last committed checkpoint: {ckpts / 'step-000004'}")
    monkeypatch.delenv("SHOTDISTILL_TOY_NAN_AT")
    run_recipe(recipe)  # resumes from step 4 and finishes
    assert sorted(_losses(tmp_path / "runs/toy")) == list(range(1, 13))


def test_uncommitted_checkpoint_is_never_resumed(tmp_path, toy_recipe):
    recipe = toy_recipe(tmp_path)
    run_recipe(recipe)
    run = tmp_path / "runs/toy"
    ckpts = run / "toy/checkpoints"
    fake = checkpoint.step_dir(ckpts, 16)
    shutil.copytree(checkpoint.step_dir(ckpts, 12), fake)
    (fake / checkpoint.MARKER).unlink()  # a crash mid-write...
    for state in fake.glob("rank-*.pt"):
        state.write_bytes(b"torn")  # ...so resuming from it could not even load
    assert checkpoint.resolve_resume("auto", ckpts) == checkpoint.step_dir(ckpts, 12)
    with pytest.raises(FileNotFoundError, match="not a committed checkpoint"):
        checkpoint.resolve_resume(str(fake), ckpts)
    (run / "toy/DONE").unlink()
    run_recipe(recipe, ["train.steps=20"])
    assert sorted(_losses(run)) == list(range(1, 21))
    assert [s for s, _ in checkpoint.committed(ckpts)] == [16, 20]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signals_are_caught_until_the_step_ends(signum):
    from distill.trainer import _StopSignals
    before = signal.getsignal(signum)
    with _StopSignals() as stop:
        os.kill(os.getpid(), signum)  # would end the process without the handler
        assert stop.received == signum
    assert signal.getsignal(signum) == before
