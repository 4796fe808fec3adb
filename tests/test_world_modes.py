"""The synthetic world's caption modes, sprite scale, cut rule and held-out stories; the normalised
PatchCodec; the lr schedule's decay."""

import json
import math

import pytest
import torch

from distill.data.synth import SynthSettings, render_video, story_lines
from distill.data.world import COLOURS, SHAPES, BACKGROUNDS
from distill.trainer import Warmup
from teacher.encoders import PatchCodec

BASE = SynthSettings(videos=12, seed=3, height=32, width=32, fps=8, min_shots=3, max_shots=5,
                     min_frames=6, max_frames=10, max_cast=3, speed=1.0)


def _with(**changes) -> SynthSettings:
    return SynthSettings(**{**BASE.__dict__, **changes})


def _words(caption: str) -> set[str]:
    return set(caption.replace(":", " ").split())


def test_memory_mode_names_colours_only_in_the_first_shot():
    for i in range(BASE.videos):
        _, facts = render_video(i, _with(captions="memory"))
        cast = facts["cast"]
        assert len({c["shape"] for c in cast}) == len(cast)  # "the circle" names one character
        colours = set(COLOURS) | set(BACKGROUNDS)
        first, *later = [s["caption"] for s in facts["shots"]]
        assert facts["background"] in _words(first)
        for caption in later + [facts["global_caption"]]:
            assert not _words(caption) & colours, caption
            assert _words(caption) & set(SHAPES)


def test_full_mode_names_the_colour_of_every_character_in_view():
    _, full = render_video(0, BASE)
    assert all(c["colour"] in _words(s["caption"]) for s in full["shots"]
               for c in full["cast"] if c["id"] in {x["id"] for x in s["characters"]})


def test_consecutive_shots_never_share_a_framing():
    for i in range(BASE.videos):
        _, facts = render_video(i, BASE)
        framings = [s["framing"] for s in facts["shots"]]
        assert all(a != b for a, b in zip(framings, framings[1:])), framings


def test_sprite_scale_scales_every_radius():
    _, small = render_video(1, BASE)
    _, large = render_video(1, _with(sprite_scale=1.5))
    for a, b in zip(small["shots"], large["shots"]):
        for ca, cb in zip(a["characters"], b["characters"]):
            assert cb["radius"] == pytest.approx(1.5 * ca["radius"], abs=2e-3)


def test_bad_caption_mode_or_scale_is_refused():
    for bad in (_with(captions="terse"), _with(sprite_scale=0.0)):
        with pytest.raises(ValueError, match="data.synth"):
            bad.check()


def test_stories_have_exactly_the_asked_shots_and_their_facts():
    lines = [json.loads(x) for x in story_lines(_with(videos=3, captions="memory"), 4)]
    assert [len(x["shots"]) for x in lines] == [4, 4, 4]
    for x in lines:
        assert [s["caption"] for s in x["shots"]] == [s["caption"] for s in x["facts"]["shots"]]


def test_stories_command_writes_the_file(tmp_path, capsys):
    from launch.cli import main

    out = tmp_path / "stories.jsonl"
    assert main(["data", "stories", "--out", str(out), "--seed", "9", "--count", "2", "--shots", "3",
                 "data.synth.height=32", "data.synth.width=32"]) == 0
    assert len(out.read_text().splitlines()) == 2


def test_normalised_patch_codec_round_trips_and_standardises():
    pixels = torch.rand(1, 3, 2, 8, 8) * 2 - 1
    codec = PatchCodec(2, mean=-0.4, std=0.5)
    latents = codec.encode(pixels)
    assert torch.allclose(latents, PatchCodec(2).encode((pixels + 0.4) / 0.5))
    assert torch.allclose(codec.decode(latents), pixels, atol=1e-6)
    with pytest.raises(ValueError, match="std"):
        PatchCodec(2, std=0.0)


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_lr_decays_after_warmup_to_the_floor(decay):
    s = Warmup(1.0, warmup=2, decay=decay, floor=0.1, horizon=12)
    lrs = []
    for _ in range(14):
        lrs.append(s.lr())
        s.updates += 1
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert lrs[12] == pytest.approx(0.1) and lrs[13] == pytest.approx(0.1)
    middle = 0.1 + 0.9 * (0.5 if decay == "linear" else 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[7] == pytest.approx(middle)


def test_no_decay_keeps_the_peak():
    s = Warmup(2.0, warmup=0, decay="none", floor=0.0, horizon=5)
    s.updates = 4
    assert s.lr() == 2.0
