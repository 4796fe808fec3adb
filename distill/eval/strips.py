"""Story strips: every evaluated model's video of one story, side by side, to look at.

After an evaluation has generated every model's videos of the same prompts and seeds, rank 0 reads
them back from the mp4s the scoring loop wrote (so this needs nothing but the output folder):
report.json names the evaluated stages (`stages.evaluated`, in `eval.stages` order) and each
report's `videos` name their sample and shot lengths. The final student is a row of its own, last
and labelled `final`, only when it is none of the evaluated stages (an export given to
`shotdistill eval`, or `eval.stages` empty); a run without one has only its stages' rows.

`<eval>/strips/story_<i>.png` (i = the prompt's index, as in samples/NNNN.mp4): one row per model,
its name at the left, then the first and last frame of each shot, a gap between shots. Frames are
scaled to THUMB pixels high (nearest neighbour when enlarged: the tiny world's sprites stay sharp).
With a TensorBoard folder the strip is also the image `eval/strip/story_<i>` and each row's video
the GIF `eval/<row>/story_<i>`: tags that are the same in every run, so the Images tab shows runs'
stories side by side.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

THUMB = 128         # pixels: the height of every frame in a strip and a GIF
FRAME_GAP = 2       # pixels between the first and last frame of a shot
SHOT_GAP = 10       # pixels between shots
ROW_GAP = 4         # pixels between rows
LABEL_PAD = 6       # pixels left and right of a row's name
FINAL = "final"     # the row of the final student when it is none of the evaluated stages
STEP = 1            # the TensorBoard step of every eval summary (its scalars: distill/eval/stages.py)
STRIPS_FOLDER = "strips"
BACKGROUND, INK = (255, 255, 255), (0, 0, 0)


def strip_rows(out: Path) -> list[tuple[str, Path]]:
    """(row name, report.json) of every model an evaluation in `out` scored, in row order."""
    report = json.loads((out / "report.json").read_text())
    evaluated = report.get("stages", {}).get("evaluated", {})
    rows = [(name, out / where) for name, where in evaluated.items()]
    if report.get("videos") and "report.json" not in evaluated.values():
        rows.append((FINAL, out / "report.json"))
    return rows


def story_videos(report: Path) -> dict[int, tuple[Path, list[int]]]:
    """{prompt index: (sample mp4, shot lengths)} of one report."""
    videos = json.loads(report.read_text())["videos"]
    return {v["index"]: (report.parent / v["sample"], list(v["shot_frames"])) for v in videos}


def thumbnail(frame: np.ndarray):
    """A uint8 [H, W, 3] frame as a PIL image THUMB pixels high."""
    from PIL import Image

    image = Image.fromarray(frame)
    width = max(1, round(image.width * THUMB / image.height))
    return image.resize((width, THUMB), Image.NEAREST if THUMB >= image.height else Image.BOX)


def shot_ends(frames: np.ndarray, lengths: list[int]) -> list[list[np.ndarray]]:
    """The first and last frame of each shot (one frame for a one-frame shot)."""
    out, start = [], 0
    for n in lengths:
        out.append([frames[start]] if n == 1 else [frames[start], frames[start + n - 1]])
        start += n
    return out


def label_width(names: list[str]) -> int:
    """The width of the name column for rows `names`, in PIL's default font."""
    from PIL import Image, ImageDraw, ImageFont

    draw, font = ImageDraw.Draw(Image.new("RGB", (1, 1))), ImageFont.load_default()
    return max(draw.textbbox((0, 0), name, font=font)[2] for name in names) + 2 * LABEL_PAD


def row_width(shots: list[list]) -> int:
    """Pixels the frames of one row take: thumbnails, the gaps inside shots and between them."""
    return sum(sum(t.width for t in shot) + FRAME_GAP * (len(shot) - 1) for shot in shots) + \
        SHOT_GAP * (len(shots) - 1)


def strip_image(rows: list[tuple[str, list[list]]]):
    """One PIL image: per row its name, then its shots' thumbnails (see module doc)."""
    from PIL import Image, ImageDraw, ImageFont

    left = label_width([name for name, _ in rows])
    canvas = Image.new("RGB", (left + max(row_width(shots) for _, shots in rows),
                               len(rows) * THUMB + (len(rows) - 1) * ROW_GAP), BACKGROUND)
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for r, (name, shots) in enumerate(rows):
        top = r * (THUMB + ROW_GAP)
        box = draw.textbbox((0, 0), name, font=font)
        draw.text((LABEL_PAD, top + (THUMB - box[3] - box[1]) // 2), name, fill=INK, font=font)
        x = left
        for shot in shots:
            for thumb in shot:
                canvas.paste(thumb, (x, top))
                x += thumb.width + FRAME_GAP
            x += SHOT_GAP - FRAME_GAP
    return canvas


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_strips(out: Path, tb_dir: Path | None) -> list[Path]:
    """Every story's strip under `out`/strips/ and, with `tb_dir`, in TensorBoard (rank 0 only);
    the PNGs written (none when nothing was scored)."""
    from distill.eval.media import MediaLog
    from teacher.files import write_atomic

    rows = [(name, story_videos(report)) for name, report in strip_rows(Path(out))]
    if not rows:
        return []
    # without a TensorBoard folder the log is off and never writes to the folder it is given
    media = MediaLog(tb_dir or Path(out), "eval", main=True, enabled=tb_dir is not None, after=True)
    (Path(out) / STRIPS_FOLDER).mkdir(parents=True, exist_ok=True)
    written = []
    for i in sorted(rows[0][1]):
        image = strip_image([(name, _row(name, i, *videos[i], media)) for name, videos in rows])
        encoded = png_bytes(image)
        written.append(Path(out) / STRIPS_FOLDER / f"story_{i}.png")
        write_atomic(written[-1], encoded)
        media.image(STEP, f"strip/story_{i}", encoded, image.height, image.width)
    media.close()
    return written


def _row(name: str, i: int, sample: Path, lengths: list[int], media) -> list[list]:
    """One row's shot thumbnails of story i; its whole video goes to `media` as a GIF."""
    import torch

    from distill.data.video import decode_all, source_fps

    frames = decode_all(sample)
    if media.on:
        gif = torch.from_numpy(np.stack([np.asarray(thumbnail(f)) for f in frames]))
        media.gif(STEP, f"{name}/story_{i}", gif, source_fps(sample))
    return [[thumbnail(f) for f in shot] for shot in shot_ends(frames, lengths)]
