"""The main job, `shotdistill run recipes/tiny.yaml`, end to end on CPU: every product a newcomer is promised."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import av
import pytest
from conftest import REPO, shotdistill

TRAINING_STAGES = ("teacher", "causal-init", "dmd-intra", "dmd-inter")


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(tmp_path: Path):
    # Run from a copy of the repository root, as a newcomer does (eval reads recipes/tiny/stories.jsonl).
    work = tmp_path / "work"
    shutil.copytree(REPO / "recipes", work / "recipes")
    done = shotdistill(["run", "recipes/tiny.yaml", "logging.progress=false"], cwd=work, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    run = work / "runs" / "tiny"

    from diffusers import DiffusionPipeline
    DiffusionPipeline.from_pretrained(str(run / "export"), trust_remote_code=True)

    videos = sorted((run / "eval" / "samples").glob("*.mp4"))
    assert len(videos) == 8
    with av.open(str(videos[0])) as container:
        frames = sum(1 for _ in container.decode(video=0))
    assert frames == 5 * 6  # five shots of data.shot_frames frames
    assert len(list((run / "eval" / "strips").glob("story_*.png"))) == 8

    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    for name in ("inter_identity", "motion_adherence", "cut_accuracy", "fps", "latency_s"):
        assert name in metrics, f"eval/metrics.json lacks {name}"
    for stage in TRAINING_STAGES:  # every stage scored on the same stories (eval.stages)
        assert f"{stage}/identity_match" in metrics, f"eval/metrics.json lacks the {stage} row"
    assert (run / "eval" / "stages.md").is_file()

    # the teacher draws the story's colours and, in part, its sprites: uniform noise scores 0 on both
    # (tests/test_metric_ends.py); measured 2026-12-01 with teacher.timestep_shift 8: colour 0.69,
    # identity 0.23 (at shift 1 it painted noise textures: colour 0.30, identity 0). Issue 15's goals
    # (colour 0.8, identity 0.6) are not met.
    assert metrics["teacher/colour_consistency"] >= 0.5, metrics
    assert metrics["teacher/identity_match"] >= 0.1, metrics
    # the students learn colours and sprites from it (measured colour 0.52 / 0.53 / 0.53, identity
    # 0.19 / 0.15 / 0.16); uniform noise scores 0
    for stage in TRAINING_STAGES[1:]:
        assert metrics[f"{stage}/colour_consistency"] >= 0.35, (stage, metrics)
        assert metrics[f"{stage}/identity_match"] >= 0.05, (stage, metrics)

    # the causal init's purpose: its student's 4-step cached samples end closer to the teacher's than
    # the uninitialised student's (the teacher's weights under chunk-causal attention)
    init = json.loads((run / "causal-init" / "metrics.json").read_text())
    assert init["eval_distance_after"] < init["eval_distance_before"], init

    for stage in TRAINING_STAGES:
        events = (run / "tb" / stage).glob("events.out.tfevents.*")  # .runinfo: the runner's HParams
        assert [p for p in events if not p.name.endswith(".runinfo")], f"no TensorBoard events for {stage}"
        assert (run / stage / "DONE").is_file()

    again = shotdistill(["run", "recipes/tiny.yaml", "logging.progress=false"], cwd=work, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "done earlier" in again.stdout + again.stderr
