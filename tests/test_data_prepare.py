"""Preparation: shards decode to the frames PyAV reads, bad lines are skipped and named, resume redoes nothing."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distill.config import load_recipe
from distill.data.synth import synthesize
from distill.data.video import decode_all, fit, resample
from distill.data.components import synth_settings
from distill.stages.prepare import prepare
from launch.cli import main
from launch.data import default_recipe
from student.video import write_mp4
from distill.data.components import build_codec
from teacher.encoders import pixels_to_uint8

TINY = ["data.synth.videos=5", "data.synth.seed=1", "data.synth.max_frames=14", "data.shot_frames=12",
        "data.records_per_shard=2", "logging.progress=false"]


def tiny_cfg(*overrides):
    return load_recipe(default_recipe(), TINY + list(overrides))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    manifest = synthesize(root / "world", synth_settings(tiny_cfg().data.synth))
    report = prepare(tiny_cfg(), manifest, root / "out", progress=False)
    return root, manifest, report


def test_shard_latents_decode_to_the_frames_pyav_reads(prepared):
    root, manifest, report = prepared
    assert report == {"prepared": [f"video_{i:04d}" for i in range(5)], "skipped": []}
    index = json.loads((root / "out/index.json").read_text())
    assert index["shards"] == ["shard-00000", "shard-00001", "shard-00002"]
    lines = [json.loads(x) for x in manifest.read_text().splitlines()]
    cfg = tiny_cfg()
    codec, side = build_codec(cfg.codec), cfg.data.height // cfg.codec.patch
    for rec in index["records"]:
        tensors = load_file(root / "out" / f"{rec['shard']}.safetensors")
        decoded = decode_all(root / "world" / lines[rec["line"] - 1]["video"])
        for j, shot in enumerate(lines[rec["line"] - 1]["shots"]):
            latents = tensors[f"{rec['slot']}/shot{j}/latents"]
            # a shot keeps its own length (at most data.shot_frames = 12), cut to whole 3-frame chunks
            length = min(shot["end"] - shot["start"], 12) // 3 * 3
            assert latents.shape == (12, length, side, side) and rec["shot_frames"][j] == length
            frames = pixels_to_uint8(codec.decode(latents[None])[0]).numpy()
            assert np.array_equal(frames, decoded[shot["start"]:shot["start"] + length])
        assert len({n for rec in index["records"] for n in rec["shot_frames"]}) > 1  # many lengths
        assert f"{rec['slot']}/shot0/frames" not in tensors  # PatchCodec: context frames are the latents


def test_text_embeddings_are_the_encoders_real_tokens(prepared):
    from distill.data.components import build_text_encoder
    root, _, _ = prepared
    rec = json.loads((root / "out/index.json").read_text())["records"][0]
    tensors = load_file(root / "out" / f"{rec['shard']}.safetensors")
    text = build_text_encoder(tiny_cfg().text_encoder)
    expected = text.encode([rec["global_caption"], rec["captions"][1]])
    assert torch.equal(tensors[f"{rec['slot']}/global_text"], expected[0])
    assert torch.equal(tensors[f"{rec['slot']}/shot1/text"], expected[1])


def test_resume_skips_committed_shards_and_redoes_a_missing_one(prepared, tmp_path):
    root, manifest, report = prepared
    out = root / "out"
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    before = load_file(out / "shard-00001.safetensors")
    (out / "shard-00001.json").unlink()          # as if killed before the sidecar landed
    (out / ".shard-00001.safetensors.tmp-99").write_bytes(b"partial")
    assert prepare(tiny_cfg(), manifest, out, progress=False) == report
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    assert {k for k in after if after[k] != stamps.get(k)} == {"shard-00001.json", "shard-00001.safetensors"}
    assert not list(out.glob(".shard-*"))
    redone = load_file(out / "shard-00001.safetensors")
    assert before.keys() == redone.keys() and all(torch.equal(before[k], redone[k]) for k in before)
    with pytest.raises(ValueError, match=r"prepared with other settings \(shot_frames\)"):
        prepare(tiny_cfg("data.shot_frames=9"), manifest, out, progress=False)


def test_resample_and_fit():
    assert resample(10, 20, 16, 8) == [10, 12, 14, 16, 18]
    assert resample(0, 5, 8, 8) == [0, 1, 2, 3, 4]
    assert resample(0, 4, 8, 16) == [0, 0, 1, 1, 2, 2, 3, 3]
    frame = np.zeros((40, 80, 3), np.uint8)
    frame[:, 20:60] = 200                      # the centre 40x40 square survives the crop
    out = fit(frame, 20, 20)
    assert out.shape == (20, 20, 3) and (out[:, 1:-1] == 200).all()
    assert 0 < out[0, 0, 0] < 200              # antialiasing blends in the cropped-off border
    same = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert fit(same, 8, 8) is same


def _bad_manifest(folder: Path, world: Path) -> Path:
    """Lines 1, 6 and 10 are good; every other line is one kind of bad record."""
    good = json.loads((world / "manifest.jsonl").read_text().splitlines()[0])
    video = str(world / good["video"])
    good["facts"] = str(world / good["facts"])  # absolute paths work as well as relative ones
    (folder / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video" * 10)
    frames = np.full((14, 64, 64, 3), 90, np.uint8)
    write_mp4(folder / "clip.mp4", frames, 8)
    shot = {"start": 0, "end": 12, "caption": "wide: the red circle stays still on a blue background"}
    lines = [
        good | {"video": video},
        {"video": "missing.mp4", "global_caption": "g", "shots": [shot]},
        {"video": "corrupt.mp4", "global_caption": "g", "shots": [shot]},
        {"video": video, "id": "range", "global_caption": "g", "shots": [shot | {"start": 20, "end": 500}]},
        {"video": video, "id": "short", "global_caption": "g", "shots": [shot | {"end": 2}]},  # < 1 chunk
        {"id": "clips", "global_caption": "g", "shots": [shot | {"video": "clip.mp4", "start": 0, "end": 14},
                                                         {"video": "clip.mp4", "caption": "close-up: x"}]},
        {"video": video, "id": "empty", "global_caption": "g", "shots": [shot | {"caption": "  "}]},
        None,
        {"video": video, "id": "extra", "global_caption": "g", "shots": [shot], "lens": 35},
        good | {"video": video, "id": "again"},
    ]
    text = "\n".join("{not json" if x is None else json.dumps(x) for x in lines)
    (folder / "bad.jsonl").write_text(text + "\n")
    return folder / "bad.jsonl"


def _cli(capsys, *args):
    """`shotdistill ARGS` in this process: (exit code, stdout, stderr)."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_bad_records_are_skipped_by_line_and_good_ones_prepared(prepared, tmp_path, capsys):
    manifest = _bad_manifest(tmp_path, prepared[0] / "world")
    code, out, err = _cli(capsys, "data", "prepare", str(manifest), "--out", str(tmp_path / "out"), *TINY)
    assert code == 0, err
    assert out.strip().splitlines()[-1] == "prepared 3 records, skipped 7"
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert report["prepared"] == [str(Path(prepared[0] / "world/video_0000")), "clips", "again"]
    reasons = {s["line"]: s["reason"] for s in report["skipped"]}
    assert sorted(reasons) == [2, 3, 4, 5, 7, 8, 9]
    assert "video not found" in reasons[2] and "missing.mp4" in reasons[2]
    assert "cannot decode video" in reasons[3]
    assert "range 20..500 is outside the video" in reasons[4]
    assert "too short: 2 frames at 8 fps, need at least 3 (one student chunk)" in reasons[5]
    assert "empty caption" in reasons[7]
    assert "malformed JSON" in reasons[8]
    assert "unknown field 'lens'" in reasons[9]
    for line, reason in reasons.items():
        assert f"bad.jsonl:{line}: {reason}" in err


def test_nothing_prepared_or_no_manifest_fails(tmp_path, capsys):
    (tmp_path / "none.jsonl").write_text('{"video": "nope.mp4"}\n')
    out = str(tmp_path / "o")
    code, _, err = _cli(capsys, "data", "prepare", str(tmp_path / "none.jsonl"), "--out", out, *TINY)
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("shotdistill: error: no record was prepared")
    code, _, err = _cli(capsys, "data", "prepare", str(tmp_path / "absent.jsonl"), "--out", out)
    assert code == 1 and err.strip() == f"shotdistill: error: {tmp_path / 'absent.jsonl'}: manifest not found"


def test_joint_caption_layout_stores_the_prompt_so_far_as_one_string(prepared, tmp_path):
    from distill.data.components import build_text_encoder
    from distill.data.datasets import PreparedData, PromptDataset

    root, manifest, _ = prepared
    cfg = tiny_cfg("text_encoder.caption_layout=joint")
    prepare(cfg, manifest, tmp_path / "joint", progress=False)
    data = PreparedData(tmp_path / "joint")
    rec = data.records[0]
    encoder = build_text_encoder(cfg.text_encoder)
    for j in range(len(rec["captions"])):
        want = encoder.joint_text(rec["global_caption"], rec["captions"][:j + 1])
        torch.testing.assert_close(data.shot_text(rec, j), want)
    separate = PreparedData(root / "out")
    assert not torch.equal(separate.shot_text(separate.records[0], 1), data.shot_text(rec, 1))
    assert PromptDataset(tmp_path / "joint")[0]["texts"].shape[1:] == (64, 32)
