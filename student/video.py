"""mp4 writing with PyAV (H.264, yuv420p): whole clips at once, or frames appended as they stream in.

The file is written under a temporary name next to the target and renamed into place when it is
closed, so a reader never sees half a video; an error while writing leaves no file behind. x264
and the RGB → yuv420p conversion run on one thread, the conversion with bit-exact swscale flags, so
that the bytes depend on nothing but the frames (not on the CPUs a process may use).
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np

from teacher.files import temp_path


def exact_interpolation():
    """swscale flags for colour conversion that does not depend on CPU features or thread count."""
    from av.video.reformatter import Interpolation

    return Interpolation.BILINEAR | Interpolation.ACCURATE_RND | Interpolation.BITEXACT


class Mp4Writer:
    """Append uint8 frames [F, H, W, 3] to an mp4; `close()` (or leaving the `with`) commits it."""

    def __init__(self, path: str | os.PathLike, fps: int | float, crf: int = 10, pix_fmt: str = "yuv420p") -> None:
        import av

        if fps <= 0:
            raise ValueError(f"{path}: frame rate must be positive, got {fps}")
        self.path = Path(path)
        self.tmp = temp_path(self.path)
        if pix_fmt not in ("yuv420p", "yuv444p"):
            raise ValueError(f"{path}: pixel format must be yuv420p or yuv444p, got {pix_fmt}")
        self.fps, self.crf, self.pix_fmt = Fraction(fps).limit_denominator(1001), crf, pix_fmt
        self.container = av.open(str(self.tmp), mode="w", format="mp4")  # the temporary name has no .mp4
        self.stream = None
        self.frames = 0

    def _open_stream(self, height: int, width: int) -> None:
        if self.pix_fmt == "yuv420p" and (height % 2 or width % 2):
            raise ValueError(f"{self.path}: yuv420p needs an even frame size, got {height}x{width}")
        stream = self.container.add_stream("libx264", rate=self.fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = self.pix_fmt
        stream.codec_context.thread_count = 1
        # x264's lookahead (lowres frame analysis: rc-lookahead, mbtree, b-adapt, scenecut) reads
        # memory it never initialised, so the same frames sometimes encode differently; without it
        # the output is a function of the frames alone
        stream.options = {"crf": str(self.crf), "preset": "medium", "threads": "1",
                          "x264-params": "rc-lookahead=0:mbtree=0:b-adapt=0:scenecut=0"}
        self.stream = stream

    def append(self, frames) -> None:
        """Encode uint8 frames [F, H, W, 3] (numpy or torch); all frames share the first one's size."""
        import av

        array = frames.numpy() if hasattr(frames, "numpy") else np.asarray(frames)
        if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
            raise ValueError(f"{self.path}: frames must be uint8 [F, H, W, 3], got {array.dtype} {list(array.shape)}")
        if self.stream is None:
            self._open_stream(array.shape[1], array.shape[2])
        elif (array.shape[1], array.shape[2]) != (self.stream.height, self.stream.width):
            raise ValueError(f"{self.path}: frame size {array.shape[1]}x{array.shape[2]} differs from the "
                             f"video's {self.stream.height}x{self.stream.width}")
        flags = exact_interpolation()
        for frame in array:
            rgb = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            yuv = rgb.reformat(format=self.pix_fmt, threads=1, interpolation=flags)
            self.container.mux(self.stream.encode(yuv))
        self.frames += len(array)

    def close(self) -> Path:
        """Flush the encoder and move the file into place; a video needs at least one frame."""
        if self.stream is None:
            self.abort()
            raise ValueError(f"{self.path}: no frames to write")
        self.container.mux(self.stream.encode())
        self.container.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the partial file."""
        try:
            self.container.close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int | float, crf: int = 10,
              pix_fmt: str = "yuv420p") -> None:
    """Write uint8 frames [F, H, W, 3] as H.264 mp4 (yuv420p plays everywhere; yuv444p keeps full
    chroma, which a few-pixel sprite needs), atomically."""
    with Mp4Writer(path, fps, crf, pix_fmt) as writer:
        writer.append(frames)
