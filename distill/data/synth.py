"""Render the synthetic sprite world to real mp4 files, their facts, and a manifest.

`synthesize(out, settings)` writes `video_NNNN.mp4`, `video_NNNN.facts.json` (the facts of every
shot: framing, characters in view with motion, radius and centre at the shot's first and last
frame) and `manifest.jsonl`. Video i is drawn from numpy's generator seeded by (seed, i), so the
output is a pure function of the settings, and a video can be regenerated alone.

Each character moves `speed` pixels per frame (scaled with the framing) and starts where its whole
path stays inside the frame; when the frame is too small for that, the speed is reduced until it
fits, and the facts hold the actual path.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from distill.data.world import (BACKGROUNDS, CAPTION_MODES, COLOURS, FRAMINGS, MOTIONS, SIZES, Character,
                                ScenePlan, ShotPlan, captions, plan_scene)
from student.video import write_mp4
from teacher.files import write_atomic


@dataclass(frozen=True)
class SynthSettings:
    videos: int
    seed: int
    height: int
    width: int
    fps: int
    min_shots: int
    max_shots: int
    min_frames: int
    max_frames: int
    max_cast: int
    speed: float
    captions: str = "full"
    sprite_scale: float = 1.0

    def check(self) -> None:
        if not (1 <= self.min_shots <= self.max_shots and 1 <= self.min_frames <= self.max_frames):
            raise ValueError("data.synth: need 1 <= min_shots <= max_shots and 1 <= min_frames <= max_frames")
        if not 1 <= self.max_cast <= 3 or self.videos < 1 or min(self.height, self.width) < 16:
            raise ValueError("data.synth: need videos >= 1, 1 <= max_cast <= 3 and frames of at least 16x16")
        if self.captions not in CAPTION_MODES or self.sprite_scale <= 0:
            raise ValueError(f"data.synth: captions must be one of {CAPTION_MODES} and sprite_scale > 0")


def _mask(shape: str, h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean [h, w] mask of a shape centred at (cx, cy) with radius r (pixel centres at +0.5)."""
    y, x = np.mgrid[0:h, 0:w] + 0.5
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    # apex up; the half-width grows from 0 at the top (cy - r) to r at the base (cy + r)
    return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)


def _path(rng: np.random.Generator, motion: str, frames: int, radius: float, speed: float,
          h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Centres at the first and last frame, keeping the whole path inside the frame."""
    d = np.array(MOTIONS[motion], dtype=float)
    room = np.array([w, h], dtype=float) - 2 * radius
    travel = speed * (frames - 1)
    span = np.abs(d) * travel
    if np.any(span > room):
        travel = float(np.min(np.where(np.abs(d) > 0, room, np.inf)))
        span = np.abs(d) * travel
    lo = radius + np.where(d < 0, span, 0.0)
    hi = radius + room - np.where(d > 0, span, 0.0)
    start = lo + rng.random(2) * np.maximum(hi - lo, 0.0)
    return start, start + d * travel


# a square's corner lies 0.85·√2 radii from its centre, the other shapes within one radius: centres
# this many summed radii apart never touch
APART = 1.21
PLACEMENT_TRIES = 64


def _closest(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], frames: int) -> float:
    """Smallest distance between two linear paths' centres over the shot's frames."""
    t = np.linspace(0.0, 1.0, max(frames, 2))[:, None]
    return float(np.min(np.linalg.norm((a[0] - b[0]) + (a[1] - a[0] - b[1] + b[0]) * t, axis=1)))


def _placed_apart(rng: np.random.Generator, motion: str, frames: int, radius: float, speed: float,
                  s: SynthSettings, others: list[tuple[tuple[np.ndarray, np.ndarray], float]]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """A path that never touches the characters already placed, when one of PLACEMENT_TRIES draws
    finds it (sprites that overlap cannot be read off the frames); else the last draw."""
    for _ in range(PLACEMENT_TRIES):
        path = _path(rng, motion, frames, radius, speed, s.height, s.width)
        if all(_closest(path, p, frames) >= APART * (radius + r) for p, r in others):
            break
    return path


def render_shot(rng: np.random.Generator, plan: ScenePlan, shot: ShotPlan, s: SynthSettings,
                before: dict[int, tuple[np.ndarray, float]] | None = None) -> tuple[np.ndarray, list[dict]]:
    """uint8 frames [F, H, W, 3] of one shot and the facts of its characters. `before` holds each
    character's last centre and radius in the previous shot: the cut moves the camera, so a character
    starts clear of where it was when the frame has room (a cut must show, even with one sprite)."""
    frames = np.empty((shot.frames, s.height, s.width, 3), np.uint8)
    frames[:] = BACKGROUNDS[plan.background]
    scale = FRAMINGS[shot.framing]
    facts, placed = [], []
    for cid, motion in shot.motions.items():
        ch: Character = plan.cast[cid]
        radius = SIZES[ch.size] * min(s.height, s.width) * scale * s.sprite_scale
        was = [((before[cid][0], before[cid][0]), before[cid][1])] if before and cid in before else []
        start, end = _placed_apart(rng, motion, shot.frames, radius, s.speed * scale, s, placed + was)
        placed.append(((start, end), radius))
        for f in range(shot.frames):
            t = f / max(shot.frames - 1, 1)
            cx, cy = start + (end - start) * t
            frames[f][_mask(ch.shape, s.height, s.width, cx, cy, radius)] = COLOURS[ch.colour]
        facts.append({"id": cid, "motion": motion, "radius": round(float(radius), 3),
                      "start": [round(float(v), 3) for v in start], "end": [round(float(v), 3) for v in end]})
    return frames, facts


def render_video(index: int, s: SynthSettings) -> tuple[np.ndarray, dict]:
    """All frames of video `index` and its facts (with captions and frame ranges)."""
    rng = np.random.default_rng([s.seed, index])
    plan = plan_scene(rng, (s.min_shots, s.max_shots), (s.min_frames, s.max_frames), s.max_cast,
                      distinct_shapes=s.captions == "memory")
    glob, texts = captions(plan, s.captions)
    clips, shots, start, before = [], [], 0, {}
    for shot, caption in zip(plan.shots, texts):
        pixels, characters = render_shot(rng, plan, shot, s, before)
        before = {c["id"]: (np.array(c["end"]), c["radius"]) for c in characters}
        clips.append(pixels)
        shots.append({"start": start, "end": start + shot.frames, "framing": shot.framing,
                      "caption": caption, "characters": characters})
        start += shot.frames
    facts = {"background": plan.background, "cast": [asdict(c) for c in plan.cast],
             "global_caption": glob, "fps": s.fps, "height": s.height,
             "width": s.width, "shots": shots}
    return np.concatenate(clips), facts


def story_lines(s: SynthSettings, shots: int) -> list[str]:
    """Held-out evaluation stories: for each of the `s.videos` videos of the world `s` with exactly
    `shots` shots, a JSONL line of its captions and facts (distill/eval/prompts.py's format)."""
    s = replace(s, min_shots=shots, max_shots=shots)
    s.check()
    lines = []
    for i in range(s.videos):
        _, facts = render_video(i, s)
        lines.append(json.dumps({"id": f"story-{i}", "global_caption": facts["global_caption"],
                                 "shots": [{"caption": sh["caption"]} for sh in facts["shots"]],
                                 "facts": facts}))
    return lines


def synthesize(out: str | Path, s: SynthSettings) -> Path:
    """Write the videos, their facts and `manifest.jsonl` under `out`; return the manifest path."""
    s.check()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(s.videos):
        name = f"video_{i:04d}"
        frames, facts = render_video(i, s)
        # full chroma: at 4:2:0 a sprite a few pixels wide loses its colour at the edges
        write_mp4(out / f"{name}.mp4", frames, s.fps, pix_fmt="yuv444p")
        write_atomic(out / f"{name}.facts.json", json.dumps(facts) + "\n")
        lines.append(json.dumps({
            "video": f"{name}.mp4", "fps": s.fps, "global_caption": facts["global_caption"],
            "facts": f"{name}.facts.json",
            "shots": [{k: sh[k] for k in ("start", "end", "caption")} for sh in facts["shots"]]}))
    manifest = out / "manifest.jsonl"
    write_atomic(manifest, "\n".join(lines) + "\n")
    return manifest
