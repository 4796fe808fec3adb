"""Rank-0 media summaries of a stage: images (PNG strips, animated GIF rollouts), histograms.

TensorBoard's video summary needs moviepy, which we do not use; an animated GIF written as the
encoded bytes of an image summary plays in the Images tab. Events go to the stage's TensorBoard
folder beside the scalars. This writer sets no purge step: its event file may sort after the
scalars' file, and a purge there would drop the scalars logged before it; a resumed run simply adds
a second image at the steps it redoes. A writer that follows a purging one in the same folder (the
eval's images after its scalars, which replace an earlier evaluation's) opens its file `after` every
existing one, so that the purge drops the earlier evaluation's images and not its own.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch


def gif_bytes(frames: torch.Tensor, fps: float) -> bytes:
    """An animated, looping GIF of uint8 frames [F, H, W, 3]."""
    from PIL import Image

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"GIF frames must be uint8 [F, H, W, 3]; got {frames.dtype} {list(frames.shape)}")
    images = [Image.fromarray(f.numpy()) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], loop=0,
                   duration=max(1, round(1000 / fps)))
    return buf.getvalue()


class MediaLog:
    """Image summaries (PNG, GIF) and histograms under `<stage>/<name>`; no-ops off rank 0 or when disabled."""

    def __init__(self, tb_dir: Path, stage: str, main: bool, enabled: bool, after: bool = False) -> None:
        self.tb_dir, self.stage, self.on, self.after = Path(tb_dir), stage, main and enabled, after
        self.writer = None

    def _open(self, step: int):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            from distill.logging import wait_past_existing_events
            self.tb_dir.mkdir(parents=True, exist_ok=True)
            if self.after:
                wait_past_existing_events(self.tb_dir)
            self.writer = SummaryWriter(str(self.tb_dir))
        return self.writer

    def image(self, step: int, name: str, encoded: bytes, height: int, width: int) -> None:
        """An encoded image (PNG, GIF) of `height` x `width` pixels under `<stage>/<name>`."""
        if not self.on:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=encoded)
        summary = Summary(value=[Summary.Value(tag=f"{self.stage}/{name}", image=image)])
        self._open(step)._get_file_writer().add_summary(summary, global_step=step)
        self.writer.flush()

    def gif(self, step: int, name: str, frames: torch.Tensor, fps: float) -> None:
        if self.on:
            self.image(step, name, gif_bytes(frames, fps), int(frames.shape[1]), int(frames.shape[2]))

    def histogram(self, step: int, name: str, values: torch.Tensor, bins: int) -> None:
        if not self.on:
            return
        self._open(step).add_histogram(f"{self.stage}/{name}", values.float(), global_step=step,
                                       bins=torch.arange(bins + 1, dtype=torch.float64).sub(0.5).numpy())
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
