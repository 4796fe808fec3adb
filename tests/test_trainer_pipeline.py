"""Runner orchestration: pipelines run in order, skip finished stages, resume an interrupted one;
`needs` run first when missing; frozen models are placed plain or ZeRO-3 partitioned."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import write_recipe
from distill import checkpoint
from distill.distributed import init_distributed
from distill.logging import read_scalars
from distill.runner import run_recipe
from distill.trainer import TooManyBadSteps, place_frozen


def test_pipeline_skips_finished_and_resumes_interrupted(tmp_path, toy_recipe, monkeypatch):
    toy_recipe(tmp_path, "a", train={"steps": 4})
    toy_recipe(tmp_path, "b", stage="toy_stage:ToyStageB")
    pipe = write_recipe(tmp_path / "pipe.yaml", {
        "stage": "pipeline", "pipeline": ["a.yaml", "b.yaml"],
        "run": {"name": "pipe", "out": str(tmp_path / "runs")}})
    monkeypatch.setenv("SHOTDISTILL_TOY_NAN_AT", "5,6,7")  # only stage b gets that far
    with pytest.raises(TooManyBadSteps):
        run_recipe(pipe, ["train.max_bad_steps=3"])
    run = tmp_path / "runs" / "pipe"  # run.name inherited from the pipeline recipe
    done_a = (run / "toy/DONE").read_text()
    assert not (run / "toy-b/DONE").exists()
    assert [s for s, _ in checkpoint.committed(run / "toy-b/checkpoints")] == [4]
    monkeypatch.delenv("SHOTDISTILL_TOY_NAN_AT")
    summary = run_recipe(pipe, ["train.max_bad_steps=3"])
    assert [(k, v["status"]) for k, v in summary.items()] == [("toy", "done earlier"),
                                                               ("toy-b", "ran")]
    assert (run / "toy/DONE").read_text() == done_a
    assert sorted(read_scalars(run / "tb/toy-b", "toy-b/critic/loss")) == list(range(1, 13))
    assert sorted(read_scalars(run / "tb/toy", "toy/critic/loss")) == [1, 2, 3, 4]
    assert json.loads((run / "toy-b/metrics.json").read_text())["steps"] == 12


def test_needs_run_first_only_when_missing(tmp_path, toy_recipe):
    toy_recipe(tmp_path, "first", train={"steps": 2})
    second = toy_recipe(tmp_path, "second", stage="toy_stage:ToyStageB", needs=["first.yaml"],
                        train={"steps": 2})
    summary = run_recipe(second)
    assert list(summary) == ["toy", "toy-b"]
    assert (tmp_path / "runs/second/toy/DONE").is_file()
    (tmp_path / "runs/second/toy-b/DONE").unlink()
    assert list(run_recipe(second)) == ["toy-b"]  # the need is finished: not run again


def _frozen_cfg(tmp_path, zero3: bool):
    from distill.config import load_recipe
    recipe = write_recipe(tmp_path / f"f{zero3}.yaml", {
        "stage": "x:Y", "run": {"name": "f"},
        "deepspeed": {"frozen_zero3": zero3, "param_persistence_threshold": 0, "bf16": True}})
    return load_recipe(recipe)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def test_place_frozen_plain_and_zero3(tmp_path):
    env = init_distributed(60)
    x = torch.randn(3, 4)
    expected = _net()(x).detach()
    plain = place_frozen(_net(), _frozen_cfg(tmp_path, False), env)
    assert all(not p.requires_grad for p in plain.parameters()) and not plain.training
    assert next(plain.parameters()).dtype == torch.float32  # CPU computes in fp32
    partitioned = place_frozen(_net(), _frozen_cfg(tmp_path, True), env)
    assert all(hasattr(p, "ds_id") for p in partitioned.module.parameters())  # ZeRO-3 managed
    with torch.no_grad():
        torch.testing.assert_close(partitioned(x), expected)
