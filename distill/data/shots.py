"""A manifest record's shots as training clips, at the recipe's fps and resolution, each at its own length.

A shot is resampled to the target fps from its first frame. Real shots have many lengths: a shot is
kept at its own length, cut to the longest length the codec and the student's chunks allow
(`fits`), as long as at least one chunk fits; a shot longer than `max_frames` (`data.shot_frames`)
keeps its first `max_frames` frames ("truncate": the frames right after the cut, where a next-shot
model must switch content) or every k-th frame, k the smallest stride that fits it ("stride": the
official release's way, the whole shot at a lower frame rate). A shot too short for one chunk makes
the record "too short". Every problem raises `BadRecord` naming the shot, so preparation can skip
the record with that reason.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np

from distill.data.manifest import BadRecord, Record
from distill.data.video import VideoError, read_frames, resample, source_fps


def keep_frames(n: int, max_frames: int, long_shots: str, fits: Callable[[int], int]) -> list[int]:
    """Indices among a shot's n resampled frames that it keeps (see module doc); [] when too short."""
    if n > max_frames and long_shots == "stride":
        kept = list(range(0, n, -(-n // max_frames)))
    else:
        kept = list(range(min(n, max_frames)))
    return kept[:fits(len(kept))]


def _plan(record: Record, fps: float, max_frames: int, long_shots: str,
          fits: Callable[[int], int]) -> list[tuple[int, list[int]]]:
    """Per shot, its exclusive end and the source frames it keeps."""
    plans = []
    for j, shot in enumerate(record.shots):
        src = record.fps or source_fps(shot.video)
        end = shot.end
        if end is None:
            _, end = read_frames(shot.video, [], 1, 1, to_end=True)
            if end <= shot.start:
                raise BadRecord(f"shot {j}: range {shot.start}.. is outside the video ({end} frames)")
        frames = resample(shot.start, end, src, fps)
        kept = keep_frames(len(frames), max_frames, long_shots, fits)
        if not kept:
            raise BadRecord(f"shot {j}: too short: {len(frames)} frames at {fps:g} fps, need at least "
                            f"{fits(max_frames) and _shortest(fits, max_frames)} (one student chunk)")
        plans.append((end, [frames[i] for i in kept]))
    return plans


def _shortest(fits: Callable[[int], int], max_frames: int) -> int:
    return next(n for n in range(1, max_frames + 1) if fits(n))


def load_shots(record: Record, height: int, width: int, fps: float, max_frames: int, long_shots: str,
               fits: Callable[[int], int]) -> list[np.ndarray]:
    """uint8 clips [frames, height, width, 3], one per shot of `record`, each at its own length."""
    try:
        plans = _plan(record, fps, max_frames, long_shots, fits)
        by_video: dict[Path, set[int]] = defaultdict(set)
        for shot, (end, frames) in zip(record.shots, plans):
            by_video[shot.video].update(frames + [end - 1])  # end - 1 proves the range exists
        decoded = {}
        for video, wanted in by_video.items():
            decoded[video] = read_frames(video, wanted, height, width)
        clips = []
        for j, (shot, (end, frames)) in enumerate(zip(record.shots, plans)):
            got, count = decoded[shot.video]
            if end - 1 not in got:
                raise BadRecord(f"shot {j}: range {shot.start}..{end} is outside the video "
                                f"{shot.video.name} ({count} frames)")
            clips.append(np.stack([got[i] for i in frames]))
        return clips
    except VideoError as e:
        raise BadRecord(str(e)) from None
