"""A manifest record's shots as training clips: exactly `shot_frames` frames each, at the recipe's
fps and resolution.

A shot is resampled to the target fps from its first frame; a longer shot keeps its first
`shot_frames` frames (the frames right after the cut, where a next-shot model must switch
content), a shorter one makes the whole record "too short". Every problem raises `BadRecord`
naming the shot, so preparation can skip the record with that reason.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from distill.data.manifest import BadRecord, Record
from distill.data.video import VideoError, read_frames, resample, source_fps


def _plan(record: Record, fps: float, shot_frames: int) -> list[tuple[int, list[int]]]:
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
        if len(frames) < shot_frames:
            raise BadRecord(f"shot {j}: too short: {len(frames)} frames at {fps:g} fps, "
                            f"need data.shot_frames={shot_frames}")
        plans.append((end, frames[:shot_frames]))
    return plans


def load_shots(record: Record, height: int, width: int, fps: float, shot_frames: int) -> list[np.ndarray]:
    """uint8 clips [shot_frames, height, width, 3], one per shot of `record`."""
    try:
        plans = _plan(record, fps, shot_frames)
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
