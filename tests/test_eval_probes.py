"""Protects the evaluation probes' rank split: every rank runs the same number of items (ZeRO-3 safe)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO, free_port, shotdistill
from distill.eval.probes import next_shot_colour
from distill.eval.run import EvalRun
from distill.eval.split import rank_share
from test_ode_pairs import WORLD

TEACHER = REPO / "recipes" / "tiny" / "teacher.yaml"


def test_rank_share_gives_every_rank_as_many_items_and_each_item_weight_one_once():
    for count in range(6):
        for world in (1, 2, 3, 4):
            shares = [rank_share(count, rank, world) for rank in range(world)]
            assert {len(share) for share in shares} == {-(-count // world)}
            own = sorted(i for share in shares for i, weight in share if weight == 1.0)
            assert own == list(range(count))
            assert all(weight in (0.0, 1.0) and 0 <= i < count for share in shares for i, weight in share)
    assert rank_share(1, 1, 2) == [(0, 0.0)]  # fewer items than ranks: rank 1 repeats item 0 with weight 0
    assert rank_share(5, 1, 2) == [(1, 1.0), (3, 1.0), (0, 0.0)]
    assert rank_share(5, 0, 2) == [(0, 1.0), (2, 1.0), (4, 1.0)]


@pytest.mark.slow
def test_teacher_probe_with_fewer_samples_than_ranks_finishes_under_zero3(tmp_path):
    """`shotdistill launch teacher.yaml --nproc 2` under ZeRO-3 (every parameter partitioned) with
    teacher.eval_samples=1: rank 1 samples the padding item, so both ranks run the same forwards and
    the job finishes (with items[rank::world] rank 1 ran none and left rank 0's parameter gathers
    waiting: a hang until the collective timeout); the probe's score is the one a single process
    gets from the saved teacher (the padding adds nothing)."""
    from distill.models import load_teacher
    from distill.runner import plan

    overrides = [*WORLD, f"run.out={tmp_path / 'out'}", "train.steps=2", "train.checkpoint_every=2",
                 "train.micro_batch=1", "deepspeed.zero_stage=3", "deepspeed.param_persistence_threshold=0", "teacher.eval_samples=1",
                 "sampler.steps=2", "run.dist_timeout=60"]
    done = shotdistill(["launch", str(TEACHER), "--nproc", "2", "--master", f"127.0.0.1:{free_port()}", *overrides],
                       tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    stage = tmp_path / "out" / "tiny" / "teacher"
    metrics = json.loads((stage / "metrics.json").read_text())
    cfg = plan(TEACHER, overrides).cfg
    alone = next_shot_colour(load_teacher(stage / "model").eval(), cfg, EvalRun(torch.device("cpu"), cfg.run.seed))
    assert set(alone) == {"eval_colour_with_context", "eval_colour_without_context"}
    assert {k: metrics[k] for k in alone} == pytest.approx(alone)
