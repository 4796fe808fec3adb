"""The synthetic sprite world: deterministic from its seed, captions and facts agree, colours survive mp4."""

import json

import numpy as np
import pytest

from distill.data.synth import SynthSettings, render_video, synthesize
from distill.data.video import decode_all
from distill.data.world import COLOURS, MOTIONS

SETTINGS = SynthSettings(videos=3, seed=5, height=64, width=64, fps=8, min_shots=2, max_shots=5,
                         min_frames=8, max_frames=24, max_cast=3, speed=1.0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    synthesize(out, SETTINGS)
    return out


def test_same_seed_same_files_other_seed_other_world(world, tmp_path):
    synthesize(tmp_path, SETTINGS)
    for name in ["manifest.jsonl", "video_0000.mp4", "video_0002.facts.json"]:
        assert (tmp_path / name).read_bytes() == (world / name).read_bytes()
    frames, facts = render_video(0, SETTINGS)
    other, other_facts = render_video(0, SynthSettings(**{**SETTINGS.__dict__, "seed": 6}))
    assert facts != other_facts


def test_structure_and_captions_follow_the_facts(world):
    lines = [json.loads(line) for line in (world / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    for line in lines:
        facts = json.loads((world / line["facts"]).read_text())
        cast = {c["id"]: c for c in facts["cast"]}
        assert 1 <= len(cast) <= 3 and 2 <= len(facts["shots"]) <= 5
        assert line["global_caption"] == facts["global_caption"]
        for c in cast.values():
            assert f"a {c['size']} {c['colour']} {c['shape']}" in facts["global_caption"]
        previous_end = 0
        for shot, entry in zip(facts["shots"], line["shots"]):
            assert shot["start"] == previous_end and 8 <= shot["end"] - shot["start"] <= 24
            previous_end = shot["end"]
            assert entry == {"start": shot["start"], "end": shot["end"], "caption": shot["caption"]}
            assert shot["caption"].startswith(shot["framing"] + ": ")
            assert shot["caption"].endswith(f" on a {facts['background']} background")
            for ch in shot["characters"]:
                who = cast[ch["id"]]
                verb = "stays still" if ch["motion"] == "still" else f"moves {ch['motion']}"
                assert f"the {who['colour']} {who['shape']} {verb}" in shot["caption"]
                step = np.subtract(ch["end"], ch["start"])
                assert np.allclose(np.sign(step), MOTIONS[ch["motion"]])


def test_colours_survive_compression(world):
    for i in range(3):
        facts = json.loads((world / f"video_{i:04d}.facts.json").read_text())
        decoded = decode_all(world / f"video_{i:04d}.mp4")
        cast = {c["id"]: c for c in facts["cast"]}
        for shot in facts["shots"]:
            top = shot["characters"][-1]  # drawn last, so nothing covers it
            x, y = (int(v) for v in top["start"])
            pixel = decoded[shot["start"], y, x].astype(int)
            assert np.abs(pixel - COLOURS[cast[top["id"]]["colour"]]).max() <= 40


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="min_frames <= max_frames"):
        synthesize(tmp_path, SynthSettings(**{**SETTINGS.__dict__, "min_frames": 30}))


def test_synth_command_writes_the_world(tmp_path, capsys):
    from launch.cli import main

    assert main(["data", "synth", "--out", str(tmp_path), "--videos", "2", "--seed", "4",
                 "data.synth.max_shots=2"]) == 0
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(len(json.loads(x)["shots"]) == 2 for x in lines)
    assert capsys.readouterr().out.startswith("wrote 2 videos")
