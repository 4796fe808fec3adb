"""Protects the eval's story strips (distill/eval/strips.py): a PNG per story with one row per
evaluated model in `eval.stages` order, and the same strip and each model's story GIF in TensorBoard
under tags that every run shares."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
# the eval tests' run folders: "r" (a causal-init student, evaluated without stages), and "s" and
# "t" (per-stage evaluations: teacher, causal-init and dmd-intra = the final student; a teacher alone)
from test_eval_compare import evaluated, run, staged  # noqa: F401

from distill.data.video import decode_all
from distill.eval.strips import (FINAL, FRAME_GAP, ROW_GAP, SHOT_GAP, THUMB, label_width, strip_rows)
from distill.logging import read_scalars
from launch.cli import main

SHOTS, SIZE = 2, 32  # the eval tests' prompts: 2 shots of 6 frames, 32x32
pytestmark = pytest.mark.usefixtures("one_thread")


def _accumulator(tb):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb), size_guidance={"images": 0})
    acc.Reload()
    return acc


def _images(tb) -> dict[str, int]:
    """{image tag: how many images TensorBoard shows under it} of one TensorBoard run folder."""
    acc = _accumulator(tb)
    return {tag: len(acc.Images(tag)) for tag in acc.Tags()["images"]}


def _first_frame_cell(strip: np.ndarray, row: int, left: int) -> np.ndarray:
    """The thumbnail of a row's first shot's first frame."""
    top = row * (THUMB + ROW_GAP)
    return strip[top:top + THUMB, left:left + THUMB]


def test_a_strip_per_story_has_a_row_per_evaluated_stage_in_order(staged):
    ev = staged[0]
    rows = strip_rows(ev)
    assert [name for name, _ in rows] == ["teacher", "causal-init", "dmd-intra"]  # dmd-intra is the final
    assert sorted(p.name for p in (ev / "strips").iterdir()) == ["story_0.png", "story_1.png"]
    strip = np.asarray(Image.open(ev / "strips" / "story_1.png").convert("RGB"))
    left = label_width([name for name, _ in rows])
    shot = 2 * THUMB + FRAME_GAP  # first and last frame of a shot, square frames
    assert strip.shape == (3 * THUMB + 2 * ROW_GAP, left + SHOTS * shot + (SHOTS - 1) * SHOT_GAP, 3)
    samples = [ev / "stages/teacher/samples/0001.mp4", ev / "stages/causal-init/samples/0001.mp4",
               ev / "samples/0001.mp4"]
    scale = THUMB // SIZE
    for r, sample in enumerate(samples):  # each row shows its own model's video, frames enlarged as they are
        first = decode_all(sample)[0]
        assert np.array_equal(_first_frame_cell(strip, r, left), first.repeat(scale, 0).repeat(scale, 1))
        label = strip[r * (THUMB + ROW_GAP):r * (THUMB + ROW_GAP) + THUMB, :left]
        assert (label < 128).any()  # its name is written


def test_strips_and_story_gifs_are_images_under_fixed_tags_beside_the_scalars(staged):
    ev = staged[0]
    images = _images(ev.parent / "tb" / "eval")
    want = {f"eval/{name}/story_{i}" for name in ("teacher", "causal-init", "dmd-intra") for i in (0, 1)}
    assert images == {tag: 1 for tag in want | {"eval/strip/story_0", "eval/strip/story_1"}}
    acc = _accumulator(ev.parent / "tb" / "eval")
    assert acc.Images("eval/teacher/story_0")[0].encoded_image_string[:6] == b"GIF89a"
    strip = acc.Images("eval/strip/story_1")[0]
    assert strip.encoded_image_string == (ev / "strips" / "story_1.png").read_bytes()
    assert (strip.height, strip.width) == Image.open(ev / "strips" / "story_1.png").size[::-1]
    metrics = json.loads((ev / "metrics.json").read_text())
    assert read_scalars(ev.parent / "tb" / "eval", "eval/teacher/cut_accuracy") == \
        {1: pytest.approx(metrics["teacher/cut_accuracy"])}


def test_a_run_without_a_student_strips_its_stages_alone(staged):
    ev = staged[1]
    assert [name for name, _ in strip_rows(ev)] == ["teacher"]
    assert Image.open(ev / "strips" / "story_0.png").height == THUMB


def test_the_final_student_alone_is_one_row_and_a_reevaluation_replaces_the_images(run, evaluated):
    assert [name for name, _ in strip_rows(evaluated)] == [FINAL]
    assert Image.open(evaluated / "strips" / "story_0.png").height == THUMB
    tb = run / "tb" / "eval"
    assert _images(tb) == {f"eval/{name}/story_{i}": 1 for name in (FINAL, "strip") for i in (0, 1)}
    assert main(["eval", str(run)]) == 0  # into the same folders: the earlier images go
    assert _images(tb) == {f"eval/{name}/story_{i}": 1 for name in (FINAL, "strip") for i in (0, 1)}


def test_images_logged_after_a_purge_sort_after_it(tmp_path):
    """TensorBoard reads a folder's event files in name order (creation second, host, pid, a counter
    that may pass from 9 to 10): the eval's images must come after the file whose purge replaces an
    earlier evaluation's points, or that purge drops them too."""
    from distill.eval.media import MediaLog
    from distill.logging import log_once

    log_once(tmp_path, "eval", 1, {"x": 1.0}, main=True, replace=True)
    media = MediaLog(tmp_path, "eval", main=True, enabled=True, after=True)
    media.image(1, "strip/story_0", b"png", 1, 1)
    media.close()
    files = sorted(p.name for p in tmp_path.glob("events.out.tfevents.*"))
    assert len(files) == 2 and int(files[0].split(".")[3]) < int(files[1].split(".")[3])
    assert _images(tmp_path) == {"eval/strip/story_0": 1}
