"""Protects trained references (FilmWeaver multi-concept injection): the inclusion rate is p, the crops show
their character, a training context holds them exactly as the streaming generator lays out inference
references (shot −1 first, global ⊕ own caption), the key off changes nothing, and `generate --reference`
works end to end with one-line errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import assert_stream_resumes, make_tiny_export, make_tiny_wan
from PIL import Image

from distill.config import load_recipe
from distill.data.components import build_codec, build_text_encoder, synth_settings
from distill.data.datasets import ShotDataset
from distill.data.manifest import read_manifest
from distill.data.references import check_references, crop_reference, pick_references, reference_boxes
from distill.data.shots import load_shots
from distill.data.synth import synthesize
from distill.data.world import COLOURS
from distill.stages.prepare import prepare, settings_of
from launch.cli import main
from launch.data import default_recipe
from student.generator import Reference, StreamingGenerator, VideoSettings
from student.model import CausalStudent
from teacher import NextShotTeacher

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = ["data.synth.videos=3", "data.synth.seed=2", "data.synth.min_shots=2", "data.synth.max_shots=3",
         "data.synth.min_frames=8", "data.synth.max_frames=9", "data.synth.max_cast=3", "logging.progress=false"]


def _draws(p, seed=0, epoch=0, n=4000, available=3, most=2, budget=4):
    return [pick_references(available, p, most, budget, seed, epoch, i) for i in range(n)]


@pytest.mark.parametrize("p", [0.1, 0.3, 0.7])
def test_the_inclusion_rate_is_p(p):
    n = 4000
    included = sum(bool(d) for d in _draws(p, n=n))
    assert abs(included / n - p) < 4 * math.sqrt(p * (1 - p) / n)  # 4 binomial standard deviations
    assert not any(_draws(0.0, n=200)) and all(_draws(1.0, n=200))


def test_the_count_leaves_a_history_slot_and_draws_are_pure():
    assert {len(d) for d in _draws(1.0, n=200)} == {2}  # max
    assert {len(d) for d in _draws(1.0, n=200, available=1)} == {1}  # the shot's characters
    assert {len(d) for d in _draws(1.0, n=200, budget=2)} == {1}  # budget − 1
    assert not any(_draws(1.0, n=50, budget=1)) and not any(_draws(1.0, n=50, available=0))
    assert len({d for d in _draws(1.0, n=400)}) == 3  # every pair of 3 characters, sorted
    assert _draws(0.5, seed=3, epoch=1) == _draws(0.5, seed=3, epoch=1)
    assert _draws(0.5, seed=3, epoch=1) != _draws(0.5, seed=3, epoch=2)
    assert _draws(0.5, seed=3) != _draws(0.5, seed=4)


@pytest.mark.parametrize("p, most, key", [(1.5, 1, "data.context.references.p"),
                                           (0.5, 0, "data.context.references.max")])
def test_bad_keys_are_named(p, most, key):
    with pytest.raises(ValueError, match=rf"^{key} must be"):
        check_references(p, most)


@pytest.mark.parametrize("strategy", ["dynamic", "first", "first_last"])
def test_prepared_candidates_serve_the_budgets_references_leave(strategy):
    from dataclasses import replace

    from distill.data.prepare import context_candidates
    from teacher.context import sample_context

    s = settings_of(load_recipe(default_recipe(), WORLD))
    s = replace(s, strategy=strategy, budget=5, references=3)
    lengths = [7, 12, 9, 5, 11, 8]
    for shots in range(1, len(lengths) + 1):
        for budget in range(2, 6):  # 0-3 references
            for k, f in sample_context(lengths[:shots], strategy, budget):
                assert f in context_candidates(lengths[k], s), (shots, budget, k, f)
    from teacher.context import candidate_frames
    assert context_candidates(12, replace(s, references=0)) == candidate_frames(12, strategy, 5)  # today's


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One synthetic world prepared twice: references off (today's folder) and on (p=1, max=2)."""
    root = tmp_path_factory.mktemp("refs")
    plain = load_recipe(default_recipe(), WORLD)
    on = load_recipe(default_recipe(), WORLD + ["data.context.references.p=1.0", "data.context.references.max=2"])
    manifest = synthesize(root / "world", synth_settings(plain.data.synth))
    prepare(plain, manifest, root / "plain", progress=False)
    prepare(on, manifest, root / "on", progress=False)
    return {"plain": root / "plain", "on": root / "on", "cfg": on, "manifest": manifest}


def test_off_reproduces_todays_folder_and_batches(world):
    plain, on = ShotDataset(world["plain"], "dynamic", 3), ShotDataset(world["on"], "dynamic", 3)
    assert "references" not in plain.data.settings and on.data.settings["references"] == 2
    off = ShotDataset(world["on"], "dynamic", 3, references=(0.0, 2, 7))
    for i in range(len(plain)):
        want = plain[i]
        for got in (on[i], off[i]):
            assert plain.group(i) == on.group(i) == off.group(i)
            assert torch.equal(got["latents"], want["latents"]) and torch.equal(got["text"], want["text"])
            for name in ("latents", "texts", "shots"):
                assert torch.equal(getattr(got["context"], name), getattr(want["context"], name))
    with pytest.raises(ValueError, match="prepared with 0 references per sample, data.context.references.max is 1"):
        ShotDataset(world["plain"], "dynamic", 3, references=(0.5, 1, 7))


def _clip_frame(world, record, shot):
    """The first frame of a shot as preparation loaded it."""
    s = settings_of(world["cfg"])
    codec = build_codec(world["cfg"].codec)
    entry = next(e for e in read_manifest(world["manifest"]) if e.id == record["id"])
    clips = load_shots(entry, s.height, s.width, s.fps, s.shot_frames, s.long_shots,
                       lambda n: codec.whole_chunks(n, s.chunk_frames))
    return clips[shot][0], entry


def test_crops_show_their_characters_colour(world):
    data = ShotDataset(world["on"], "dynamic", 3).data
    codec = build_codec(world["cfg"].codec)
    checked = 0
    for rec in data.records:
        for shot, captions in enumerate(rec["references"]):
            assert len(captions) == len(rec["facts"]["shots"][shot]["characters"]) >= 1
            for i, caption in enumerate(captions):
                colour = COLOURS[caption.split()[1]]
                latents = data.tensor(rec, f"shot{shot}/ref{i}/latents")
                pixels = codec.decode(latents[None, :, None])[0, :, 0].permute(1, 2, 0)
                rgb = (pixels.clamp(-1, 1) + 1) * 127.5
                near = (rgb - torch.tensor(colour, dtype=torch.float32)).norm(dim=-1) < 60
                assert near.float().mean() > 0.3, (rec["id"], shot, caption, near.float().mean())
                checked += 1
    assert checked >= 6


def _generator_layout_matches(world, folder, cfg):
    """Every item of `folder` (references p = 1) against a StreamingGenerator given the same crops."""
    from dataclasses import replace

    dataset = ShotDataset(folder, "dynamic", 4, references=(1.0, 2, 7))
    codec, text = build_codec(cfg.codec), build_text_encoder(cfg.text_encoder)
    teacher = NextShotTeacher(make_tiny_wan(in_channels=codec.channels, out_channels=codec.channels,
                                            text_dim=text.dim))
    student = CausalStudent.from_teacher(teacher, chunk_frames=cfg.student.chunk_frames, context_frames=4)
    student.settings = replace(student.settings, caption_layout=cfg.text_encoder.caption_layout)
    video = VideoSettings(cfg.data.height, cfg.data.width, cfg.data.fps, 9)
    for i, (r, target) in enumerate(dataset.items):
        rec, picks = dataset.data.records[r], dataset.reference_picks(i)
        assert picks, "p = 1 always includes references"
        frame, entry = _clip_frame(world, rec, target)
        boxes = reference_boxes(entry.facts, target, cfg.data.height, cfg.data.width)
        refs = [Reference(crop_reference(frame, boxes[k][1]), boxes[k][0]) for k in picks]
        gen = StreamingGenerator(student, codec, text, video, global_prompt=rec["global_caption"], references=refs)
        want = gen._context(rec["captions"][target])
        got = dataset[i]["context"]
        n = len(picks)
        assert got.shots[:n].tolist() == [-1] * n and want.shots[0].tolist() == [-1] * n
        torch.testing.assert_close(got.latents[:, :n], want.latents[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(got.texts[:n], want.texts[0], rtol=0, atol=1e-6)
        # the history after them: picked with the budget the references leave, as the generator's is
        history = ShotDataset(folder, "dynamic", 4 - n)[i]["context"]
        assert torch.equal(got.latents[:, n:], history.latents) and torch.equal(got.shots[n:], history.shots)
        assert got.frames == dataset.group(i)[0] <= 4 and gen.history_budget == 4 - n
    return len(dataset)


def test_a_training_context_lays_out_references_as_the_generator_does(world):
    assert _generator_layout_matches(world, world["on"], world["cfg"]) >= 6


def test_the_joint_caption_layout_matches_too(world, tmp_path):
    cfg = load_recipe(default_recipe(), WORLD + ["data.context.references.p=1.0", "data.context.references.max=2",
                                                 "text_encoder.caption_layout=joint"])
    prepare(cfg, world["manifest"], tmp_path / "joint", progress=False)
    assert _generator_layout_matches(world, tmp_path / "joint", cfg) >= 6


def test_a_student_limit_keeps_the_references_and_the_newest_history(world):
    limited = ShotDataset(world["on"], "dynamic", 3, negative=(1.0, 2, 7), limit=3, references=(1.0, 2, 7))
    for i in range(len(limited)):
        context = limited[i]["context"]
        n = len(limited.reference_picks(i))
        assert context.frames == limited.group(i)[0] <= 3 and context.shots[:n].tolist() == [-1] * n
        assert n == min(2, len(limited.data.records[limited.items[i][0]]["references"][limited.items[i][1]]))


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return make_tiny_export(tmp_path_factory.mktemp("refexport"))


def _image(path, size, colour):
    Image.fromarray(np.full((size[1], size[0], 3), colour, np.uint8)).save(path)
    return path


def test_generate_with_references_end_to_end(export, tmp_path, capsys):
    from distill.data.video import decode_all

    red = _image(tmp_path / "red.png", (20, 12), (230, 30, 30))  # not the video size: resized
    base = ["generate", str(export), "--shot", "wide: a red circle moves", "--frames", "3"]
    assert main(base + ["--out", str(tmp_path / "plain.mp4")]) == 0
    assert main(base + ["--reference", f"{red}:the red circle", "--reference", f"{red}:a: colon",
                        "--out", str(tmp_path / "ref.mp4")]) == 0
    plain, ref = decode_all(tmp_path / "plain.mp4"), decode_all(tmp_path / "ref.mp4")
    assert plain.shape == ref.shape == (3, 16, 16, 3)
    assert not np.array_equal(plain, ref)  # the references reach the global cache
    assert capsys.readouterr().out.endswith(f"wrote {tmp_path / 'ref.mp4'} (3 frames)\n")


def test_generate_reference_errors_are_one_line(export, tmp_path, capsys):
    out = tmp_path / "v.mp4"
    base = ["generate", str(export), "--shot", "wide: a red circle moves", "--out", str(out)]
    red = _image(tmp_path / "red.png", (16, 16), (230, 30, 30))
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    cases = [(["--reference", str(tmp_path / "missing.png") + ":x"], f"--reference {tmp_path / 'missing.png'}: image not found"),
             (["--reference", str(red)], f"--reference {str(red)!r}: expected IMAGE:CAPTION"),
             (["--reference", ":a caption"], "--reference ':a caption': expected IMAGE:CAPTION"),
             (["--reference", f"{text}:x"], f"--reference {text}: not a readable image (UnidentifiedImageError)"),
             (["--reference", f"{red}:a"] * 4,
              "4 reference images leave no global-cache slot for the history (context_frames 4); give at most 3")]
    for extra, message in cases:
        assert main(base + extra) == 1
        assert capsys.readouterr().err == f"shotdistill: error: {message}\n"
    assert not out.exists()


def test_a_stream_includes_the_same_after_resume_and_anew_each_epoch(world):
    from distill.data.stream import DataStream

    def stream():
        return DataStream(ShotDataset(world["on"], "dynamic", 3, references=(0.5, 2, 7)), 1, seed=7)

    def same(got, want):
        assert got["record"] == want["record"] and torch.equal(got["context"].shots, want["context"].shots)
        assert torch.equal(got["context"].latents, want["context"].latents)

    assert_stream_resumes(stream, same)
    dataset = stream().dataset
    picks = []
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        picks.append([dataset.reference_picks(i) for i in range(len(dataset))])
    assert picks[0] != picks[1]
