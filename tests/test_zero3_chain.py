"""ZeRO-3 through the whole chain: the command a user types to run everything under ZeRO-3 on 2
gloo ranks (prepare, teacher, ODE pairs, causal init, both DMD stages, every probe included)
finishes, with small step and probe counts."""

from __future__ import annotations

import json

import pytest

from conftest import REPO, free_port, shotdistill

pytestmark = pytest.mark.slow

STAGES = ("prepare", "teacher", "ode-pairs", "causal-init", "dmd-intra", "dmd-inter")
SMALL = ["train.steps=2", "train.micro_batch=1", "train.checkpoint_every=2", "data.synth.videos=4",
         "ode.pairs=4", "ode.pairs_per_shard=2", "ode.steps=2", "sampler.steps=2", "teacher.eval_samples=1",
         "causal_init.eval_pairs=2", "dmd.eval_videos=1", "dmd.sample_every=0", "logging.progress=false"]


def test_zero3_chain_on_two_ranks(tmp_path):
    result = shotdistill(["launch", str(REPO / "recipes/tiny/dmd-inter.yaml"), "--nproc", "2",
                          "--master", f"127.0.0.1:{free_port()}", "deepspeed.zero_stage=3",
                          f"run.out={tmp_path / 'runs'}", *SMALL], tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    for stage in STAGES:
        assert (run / stage / "DONE").is_file(), stage
    for stage, model in (("teacher", "teacher"), ("causal-init", "student"), ("dmd-intra", "generator"),
                         ("dmd-inter", "critic")):
        config = json.loads((run / stage / f"deepspeed.{model}.json").read_text())
        assert config["zero_optimization"]["stage"] == 3, stage
    # the probes ran on both ranks and reported
    assert "eval_distance_after" in json.loads((run / "causal-init/metrics.json").read_text())
    for stage in ("dmd-intra", "dmd-inter"):
        assert "student_colour_all_after" in json.loads((run / stage / "metrics.json").read_text())
