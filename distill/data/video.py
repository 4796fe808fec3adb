"""Video files with PyAV: read frame ranges resampled, resized, cropped (mp4 writing: student/video.py).

Colour conversion (RGB ⇄ yuv420p) is pinned to one swscale thread with bit-exact flags: otherwise
its output follows the CPUs the process may use, and the same frames would encode and decode
differently in different processes (ranks, tests).

Reading streams through the file once and keeps only the frames asked for, each resized so that it
covers the target size (aspect kept, bilinear with antialiasing) and centre-cropped; a frame that
already has the target size is kept exactly as decoded.

Resampling to a target fps maps output frame i of a range starting at source frame s to source
frame s + ⌊i · src_fps / fps⌋ (nearest earlier frame), so the first frame of a shot is always kept.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from student.video import exact_interpolation


def to_rgb(frame) -> np.ndarray:
    """A decoded frame as uint8 [H, W, 3], converted the same way in every process."""
    return frame.reformat(format="rgb24", threads=1, interpolation=exact_interpolation()).to_ndarray()


class VideoError(ValueError):
    """A video that is missing, unreadable or too short for what was asked of it."""


def resample(start: int, end: int, src_fps: float, fps: float) -> list[int]:
    """Source frame indices in [start, end) for a clip resampled from src_fps to fps."""
    if src_fps <= 0 or fps <= 0:
        raise VideoError(f"cannot resample from {src_fps} fps to {fps} fps")
    step = Fraction(src_fps).limit_denominator(1001) / Fraction(fps).limit_denominator(1001)
    out, i = [], 0
    while start + int(i * step) < end:
        out.append(start + int(i * step))
        i += 1
    return out


def fit(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize uint8 [H, W, 3] to cover height×width (aspect kept), then centre-crop to it."""
    h, w = frame.shape[:2]
    if (h, w) != (height, width):
        scale = max(height / h, width / w)
        nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
        x = torch.from_numpy(frame).permute(2, 0, 1)[None].float()
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        top, left = (nh - height) // 2, (nw - width) // 2
        frame = x[0, :, top:top + height, left:left + width].round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    return frame


def read_frames(path: str | Path, indices: Iterable[int], height: int, width: int,
                to_end: bool = False) -> tuple[dict[int, np.ndarray], int]:
    """The decoded frames at `indices` (source frame numbers) fitted to height×width, and how many
    frames were decoded: the video's length when it ended early or `to_end` is set."""
    import av

    wanted = set(indices)
    found: dict[int, np.ndarray] = {}
    last, seen = max(wanted, default=-1), 0
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(container.streams.video[0]):
                if seen in wanted:
                    found[seen] = fit(to_rgb(frame), height, width)
                seen += 1
                if seen > last and not to_end:
                    break
    except FileNotFoundError:
        raise VideoError(f"{path}: video not found") from None
    except (av.FFmpegError, IndexError) as e:
        raise VideoError(f"{path}: cannot decode video ({type(e).__name__})") from None
    return found, seen


def source_fps(path: str | Path) -> float:
    """The container's average frame rate (0 when it does not say)."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            return float(stream.average_rate or stream.guessed_rate or 0)
    except FileNotFoundError:
        raise VideoError(f"{path}: video not found") from None
    except (av.FFmpegError, IndexError) as e:
        raise VideoError(f"{path}: cannot decode video ({type(e).__name__})") from None


def decode_all(path: str | Path) -> np.ndarray:
    """Every frame of a video as uint8 [F, H, W, 3], as PyAV decodes it."""
    import av

    with av.open(str(path)) as container:
        return np.stack([to_rgb(f) for f in container.decode(video=0)])
