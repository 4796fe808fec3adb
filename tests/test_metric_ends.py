"""Protects the two ends of the fact metrics (distill/eval/metrics.py): the world's own videos of
held-out scenes score at the top, uniform noise at the bottom.

The world, its sizes and the metric thresholds are the tiny recipe's (`data.synth`, `eval.*`), read
through the config loader, so a redesigned world is measured as it is. The ground truth is scored as
rendered and as the world writes it for training (`synthesize`: its mp4 codec), which is what a
perfect model would reproduce. A sprite drawn over another hides a fact that no metric can read, so
identities and motions are held to the top only in videos where, per the facts, no two sprites come
near each other; `test_every_world_video_shows_its_facts` checks that the world avoids that (it
places sprites apart, distill/data/synth.py).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from conftest import REPO
from distill.config import load_recipe
from distill.data.components import synth_settings
from distill.data.synth import APART, render_video, synthesize
from distill.data.video import decode_all
from distill.eval.metrics import score_video
from distill.eval.scoring import scene_settings

RECIPE = REPO / "recipes/tiny/eval.yaml"  # the tiny world (common.yaml) and the eval's thresholds
VIDEOS = 16
HELD_OUT = 1000  # added to the recipe's world seed: scenes no tiny run trains on
TOP, BOTTOM = 0.95, 0.05
# Cut accuracy reads no fact, only the change curve: a cut from medium to close-up of one sprite that
# stays where it was changes about twice what its motion does, under eval.cut_ratio (3), so the
# world's own videos miss a few such cuts (0.927 on these 16; lowering the ratio to 2 adds spurious
# cuts: 0.891). Held to its own top.
CUT_TOP = 0.9
SEEN_METRICS = ("colour_consistency", "cut_accuracy")           # read off the whole frame
CHARACTER_METRICS = ("identity_match", "inter_identity", "motion_adherence")
FACT_METRICS = SEEN_METRICS + CHARACTER_METRICS

pytestmark = pytest.mark.usefixtures("one_thread")


def _lengths(facts: dict) -> list[int]:
    return [shot["end"] - shot["start"] for shot in facts["shots"]]


def _apart(facts: dict) -> bool:
    """No two sprites of a shot come within reach of each other in any frame (per the facts)."""
    for shot in facts["shots"]:
        frames, chars = shot["end"] - shot["start"], shot["characters"]
        for f in range(frames):
            t = f / max(frames - 1, 1)
            at = [np.add(c["start"], np.subtract(c["end"], c["start"]) * t) for c in chars]
            if any(np.hypot(*(at[i] - at[j])) < APART * (chars[i]["radius"] + chars[j]["radius"])
                   for i in range(len(chars)) for j in range(i)):
                return False
    return True


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> dict[str, list[tuple[dict, dict]]]:
    """{"rendered" | "written" | "noise": [(scores, facts) per held-out video]}."""
    cfg = load_recipe(RECIPE)
    world = dataclasses.replace(synth_settings(cfg.data.synth), seed=cfg.data.synth.seed + HELD_OUT,
                                videos=VIDEOS)
    scene = scene_settings(cfg.eval)
    folder = tmp_path_factory.mktemp("world")
    synthesize(folder, world)
    out = {"rendered": [], "written": [], "noise": []}
    noise = torch.Generator().manual_seed(0)
    for i in range(VIDEOS):
        frames, facts = render_video(i, world)
        assert json.loads((folder / f"video_{i:04d}.facts.json").read_text()) == facts
        written = decode_all(folder / f"video_{i:04d}.mp4")
        uniform = torch.randint(0, 256, frames.shape, dtype=torch.uint8, generator=noise)
        for kind, video in (("rendered", torch.from_numpy(frames)), ("written", torch.from_numpy(written)),
                            ("noise", uniform)):
            out[kind].append((score_video(video, _lengths(facts), facts, scene), facts))
    return out


def _top(metric: str) -> float:
    return CUT_TOP if metric == "cut_accuracy" else TOP


def _mean(rows: list[tuple[dict, dict]], metric: str) -> float:
    values = [scores[metric] for scores, _ in rows if metric in scores]
    assert values, f"no video has {metric}"
    return sum(values) / len(values)


def _report(rows: list[tuple[dict, dict]]) -> dict[str, float]:
    return {m: round(_mean(rows, m), 3) for m in FACT_METRICS}


@pytest.mark.parametrize("kind", ["rendered", "written"])
def test_the_world_scores_at_the_top_where_its_facts_are_visible(scored, kind):
    rows = scored[kind]
    apart = [row for row in rows if _apart(row[1])]
    assert len(apart) >= 4, f"only {len(apart)} of {len(rows)} held-out videos keep their sprites apart"
    low = {m: _mean(rows, m) for m in SEEN_METRICS} | {m: _mean(apart, m) for m in CHARACTER_METRICS}
    assert all(v >= _top(m) for m, v in low.items()), f"{kind}: all {_report(rows)}, apart {_report(apart)}"


def test_every_world_video_shows_its_facts(scored):
    rows = scored["written"]
    assert all(_mean(rows, m) >= _top(m) for m in FACT_METRICS), _report(rows)


def test_uniform_noise_scores_at_the_bottom(scored):
    rows = scored["noise"]
    multi = [row for row in rows if len(row[1]["shots"]) > 1]  # a one-shot video has no cut to miss
    means = {m: _mean(multi if m == "cut_accuracy" else rows, m) for m in FACT_METRICS}
    assert all(v <= BOTTOM for v in means.values()), means
