"""Protects the synthetic-world video metrics (distill/eval/metrics.py) on hand-made videos with known answers."""

from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from distill.data.synth import SynthSettings, render_shot
from distill.data.world import BACKGROUNDS, COLOURS, FRAMINGS, SHAPES, Character, ScenePlan, ShotPlan
from distill.config import schema
from distill.eval.metrics import (cut_count_accuracy, detect_cuts, label_frames, palette, score_video,
                                  shot_cut_accuracy, sightings, track_motion)
from distill.eval.scoring import scene_settings

S = SynthSettings(videos=1, seed=0, height=64, width=64, fps=8, min_shots=1, max_shots=3, min_frames=12,
                  max_frames=12, max_cast=2, speed=1.0)
CAST = [Character(0, "circle", "red", "small"), Character(1, "triangle", "green", "small")]
SHOTS = [ShotPlan(12, "wide", {0: "right", 1: "still"}), ShotPlan(12, "medium", {0: "down", 1: "left"}),
         ShotPlan(12, "close-up", {0: "up", 1: "still"})]
LENGTHS = [12, 12, 12]
SETTINGS = scene_settings(schema().eval)  # the recipe's defaults
SEED = 1  # positions drawn with this seed keep the two characters apart in every frame


pytestmark = pytest.mark.usefixtures("one_thread")


def render(plans: list[ScenePlan], seed: int = SEED) -> tuple[torch.Tensor, dict]:
    """Shot k drawn from plans[k] (the same paths whatever the shapes); facts from plans[0]."""
    rng = np.random.default_rng(seed)
    clips, shots, start = [], [], 0
    for plan, shot in zip(plans, plans[0].shots):
        pixels, characters = render_shot(rng, plan, shot, S)
        clips.append(pixels)
        shots.append({"start": start, "end": start + shot.frames, "characters": characters})
        start += shot.frames
    facts = {"background": plans[0].background, "cast": [asdict(c) for c in plans[0].cast], "shots": shots}
    return torch.from_numpy(np.concatenate(clips)), facts


@pytest.fixture(scope="module")
def video():
    plan = ScenePlan("blue", CAST, SHOTS)
    return render([plan] * 3)


def test_the_rendered_video_scores_perfectly(video):
    frames, facts = video
    m = score_video(frames, LENGTHS, facts, SETTINGS)
    assert {k: v for k, v in m.items() if k != "intra_change"} == {
        "intra_identity": 1.0, "cut_accuracy": 1.0, "cut_count_accuracy": 1.0, "identity_match": 1.0,
        "inter_identity": 1.0, "motion_adherence": 1.0, "colour_consistency": 1.0}
    assert 0 < m["intra_change"] < 0.02  # two small sprites moving about a pixel per frame


def test_identity_swap_between_shots_scores_lower(video):
    plan = ScenePlan("blue", CAST, SHOTS)
    swapped = replace(plan, cast=[replace(CAST[0], shape="triangle"), replace(CAST[1], shape="circle")])
    frames, facts = render([plan, swapped, plan])
    m = score_video(frames, LENGTHS, facts, SETTINGS)
    assert m["inter_identity"] == pytest.approx(0.5)      # shot 2 shows neither identity of the facts
    assert m["identity_match"] == pytest.approx(2 / 3)
    assert m["colour_consistency"] == 1.0 and m["intra_identity"] == 1.0  # colours and shots are self-consistent
    assert m["motion_adherence"] == 1.0 and m["cut_accuracy"] == 1.0


def test_cut_at_the_wrong_frame_scores_lower(video):
    frames, _ = video
    assert score_video(frames, LENGTHS, None, SETTINGS)["cut_accuracy"] == 1.0
    assert score_video(frames, [13, 11, 12], None, SETTINGS)["cut_accuracy"] == 1.0   # within one frame
    late = score_video(frames, [15, 9, 12], None, SETTINGS)                          # the cut comes 3 frames early
    assert late["cut_accuracy"] == pytest.approx(1 / 3)  # 1 match, 2 true, 2 detected: 1 / (2 + 2 - 1)
    assert late["cut_count_accuracy"] == 1.0
    merged = score_video(frames, [24, 12], None, SETTINGS)                            # a cut inside a shot
    assert merged["cut_accuracy"] == pytest.approx(0.5) and merged["cut_count_accuracy"] == 0.0


def test_character_moving_against_its_caption_scores_lower(video):
    frames, facts = video
    backwards = torch.cat([frames[:12].flip(0), frames[12:]])  # shot 1 played backwards: right -> left
    m = score_video(backwards, LENGTHS, facts, SETTINGS)
    assert m["motion_adherence"] == pytest.approx(5 / 6)  # the still green triangle stays right
    assert m["identity_match"] == 1.0 and m["cut_accuracy"] == 1.0


def test_motion_is_read_from_the_centroid_track(video):
    frames, facts = video
    seen = sightings(label_frames(frames[:12]))
    assert track_motion(seen, "red", None, 0.25) == "right"
    assert track_motion(seen, "green", "triangle", 0.25) == "still"
    assert track_motion(seen, "green", "square", 0.25) is None  # never seen: cannot move as asked
    assert [c["motion"] for c in facts["shots"][0]["characters"]] == ["right", "still"]


@pytest.mark.parametrize("framing", list(FRAMINGS))
@pytest.mark.parametrize("size", ["small", "large"])
def test_every_shape_is_recognised_alone(framing, size):
    cast = [Character(i, shape, colour, size) for i, (shape, colour) in enumerate(zip(SHAPES, COLOURS))]
    for character in cast:
        plan = ScenePlan("grey", cast, [ShotPlan(2, framing, {character.id: "still"})])
        frames, _ = render([plan])
        found = sightings(label_frames(frames))
        assert [(s.colour, s.shape) for s in found[0]] == [(character.colour, character.shape)]


def test_two_characters_of_one_colour_are_two_regions():
    cast = [Character(0, "square", "red", "small"), Character(1, "triangle", "red", "small")]
    plan = ScenePlan("black", cast, [ShotPlan(12, "wide", {0: "still", 1: "still"})])
    frames, facts = render([plan], seed=3)
    assert sorted((s.colour, s.shape) for s in sightings(label_frames(frames[:1]))[0]) == \
        [("red", "square"), ("red", "triangle")]
    assert score_video(frames, [12], facts, SETTINGS)["identity_match"] == 1.0


def test_labels_are_the_nearest_palette_colour_or_none():
    names, rgb = palette()
    frame = torch.zeros(1, 1, 3, 3, dtype=torch.uint8)
    frame[0, 0, 0] = torch.tensor(COLOURS["cyan"])
    frame[0, 0, 1] = torch.tensor(BACKGROUNDS["grey"]) + 20  # 34.6 away: still grey
    frame[0, 0, 2] = torch.tensor([128, 255, 128])           # far from every palette colour
    assert label_frames(frame).tolist() == [[[names.index("cyan"), names.index("grey"), -1]]]


@pytest.mark.parametrize("detected,true,expected", [
    ([], [], 1.0), ([10], [10], 1.0), ([11], [10], 1.0), ([12], [10], 0.0), ([10, 20], [10], 0.5),
    ([], [10], 0.0), ([9, 10, 11], [10], 1 / 3), ([10, 21], [11, 20], 1.0), ([5], [], 0.0)])
def test_shot_cut_accuracy_definition(detected, true, expected):
    assert shot_cut_accuracy(detected, true, tolerance=1) == pytest.approx(expected)


def test_cut_count_accuracy_definition():
    assert cut_count_accuracy([3, 7], [4, 8]) == 1.0
    assert cut_count_accuracy([3], [4, 8]) == 0.5
    assert cut_count_accuracy([1, 2, 3, 4, 5], [4, 8]) == 0.0
    assert cut_count_accuracy([], []) == 1.0 and cut_count_accuracy([2], []) == 0.0


def test_cuts_are_peaks_above_the_steady_change():
    s = SETTINGS
    steady = torch.full((20,), 0.02)
    assert detect_cuts(steady, s) == []
    spiky = steady.clone()
    spiky[7] = 0.05   # 2.5x the change around it: motion, not a cut
    spiky[13] = 0.08  # 4x: a cut, at frame 14 (the change from frame 13 to 14)
    assert detect_cuts(spiky, s) == [14]
    assert detect_cuts(torch.full((20,), 0.001).index_fill(0, torch.tensor([4]), 0.009), s) == []  # < min change


def test_a_video_without_characters_has_no_intra_identity(video):
    frames, facts = video
    empty = torch.empty_like(frames)
    empty[:] = torch.tensor(BACKGROUNDS["blue"], dtype=torch.uint8)
    m = score_video(empty, LENGTHS, facts, SETTINGS)
    assert "intra_identity" not in m  # nothing seen is not "consistent"
    assert m["identity_match"] == 0.0 and m["motion_adherence"] == 0.0 and m["cut_count_accuracy"] == 0.0
    assert m["colour_consistency"] == pytest.approx(1 / 3)  # the background alone of {blue, red, green}


def test_bad_shot_lengths_are_an_error(video):
    frames, _ = video
    with pytest.raises(ValueError, match=r"shot lengths \[12, 12\] do not cover the video's 36 frames"):
        score_video(frames, [12, 12], None, SETTINGS)
