"""The manifest: JSONL, one multi-shot video per line, paths relative to the manifest.

    {"video": "a.mp4", "global_caption": "...", "fps": 24,
     "shots": [{"start": 0, "end": 81, "caption": "..."}, {"video": "b.mp4", "caption": "..."}]}

`start`/`end` are source frame indices (end exclusive). A shot with its own `video` is a pre-cut
clip: its range defaults to the whole clip. Optional: `fps` (overrides the container's rate),
`id` (default: the video path without its suffix, or `line-N`), `facts` (a JSON file of
evaluation facts, as the synthetic world writes), and per shot `rejected`: a clip
(`{"video", "start", "end"}`, video defaulting to the record's) that is a worse continuation of the
same history and caption, the loser of the shot's Diffusion-DPO pair (`dpo.pairs: [manifest]`); it
must prepare to the shot's length. Any other field is an error.

Parsing checks what can be checked without decoding; each bad line becomes a `Skip` naming the
line, and every other line still yields its `Record`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

RECORD_FIELDS = {"video", "global_caption", "shots", "fps", "id", "facts"}
SHOT_FIELDS = {"video", "start", "end", "caption", "rejected"}
REJECTED_FIELDS = {"video", "start", "end"}


@dataclass(frozen=True)
class ShotRef:
    video: Path
    start: int
    end: int | None  # None: to the end of the clip
    caption: str
    rejected: "ShotRef | None" = None  # the manifest's dispreferred clip for this shot (its caption)


@dataclass(frozen=True)
class Record:
    line: int
    id: str
    global_caption: str
    shots: tuple[ShotRef, ...]
    fps: float | None
    facts: dict | None


@dataclass(frozen=True)
class Skip:
    line: int
    reason: str


class BadRecord(ValueError):
    """Why one manifest line cannot be prepared (the line is added by the caller)."""


def _caption(value: object, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadRecord(f"{where}: empty caption")
    return value.strip()


def _shot(raw: object, j: int, root: Path, video: Path | None) -> ShotRef:
    if not isinstance(raw, dict):
        raise BadRecord(f"shot {j}: expected an object")
    unknown = sorted(set(raw) - SHOT_FIELDS)
    if unknown:
        raise BadRecord(f"shot {j}: unknown field {unknown[0]!r}")
    ref = _clip(raw, j, root, video)
    rejected = raw.get("rejected")
    if rejected is None:
        return ref
    if not isinstance(rejected, dict) or set(rejected) - REJECTED_FIELDS:
        raise BadRecord(f"shot {j}: 'rejected' must be an object with only video, start and end")
    try:
        return replace(ref, rejected=_clip(rejected | {"caption": ref.caption}, j, root, video))
    except BadRecord as e:
        raise BadRecord(f"shot {j} rejected clip{str(e).removeprefix(f'shot {j}')}") from None


def _clip(raw: dict, j: int, root: Path, video: Path | None) -> ShotRef:
    """The clip of shot j (or of its rejected clip): a range of its own video or of the record's."""
    own = raw.get("video")
    if own is not None and not isinstance(own, str):
        raise BadRecord(f"shot {j}: 'video' must be a path")
    if own is None and video is None:
        raise BadRecord(f"shot {j}: no 'video' (neither the shot's nor the record's)")
    start, end = raw.get("start", 0 if own else None), raw.get("end")
    if own is None and (start is None or end is None):
        raise BadRecord(f"shot {j}: 'start' and 'end' are required for a cut of the record's video")
    for name, v in (("start", start), ("end", end)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise BadRecord(f"shot {j}: '{name}' must be a frame index >= 0, got {v!r}")
    if end is not None and end <= start:
        raise BadRecord(f"shot {j}: empty range {start}..{end}")
    path = root / own if own is not None else video
    if not path.is_file():
        raise BadRecord(f"shot {j}: video not found: {path}")
    return ShotRef(path, start, end, _caption(raw.get("caption"), f"shot {j}"))


def _record(raw: object, line: int, root: Path) -> Record:
    if not isinstance(raw, dict):
        raise BadRecord("expected a JSON object")
    unknown = sorted(set(raw) - RECORD_FIELDS)
    if unknown:
        raise BadRecord(f"unknown field {unknown[0]!r}")
    video = raw.get("video")
    if video is not None and not isinstance(video, str):
        raise BadRecord("'video' must be a path")
    video_path = root / video if video is not None else None
    if video_path is not None and not video_path.is_file():
        raise BadRecord(f"video not found: {video_path}")
    shots = raw.get("shots")
    if not isinstance(shots, list) or not shots:
        raise BadRecord("'shots' must be a non-empty list")
    fps = raw.get("fps")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or fps <= 0):
        raise BadRecord(f"'fps' must be a positive number, got {fps!r}")
    rid = raw.get("id", str(Path(video).with_suffix("")) if video else f"line-{line}")
    if not isinstance(rid, str) or not rid:
        raise BadRecord("'id' must be a non-empty string")
    return Record(line, rid, _caption(raw.get("global_caption"), "global_caption"),
                  tuple(_shot(s, j, root, video_path) for j, s in enumerate(shots)),
                  None if fps is None else float(fps), _facts(raw.get("facts"), root))


def _facts(name: object, root: Path) -> dict | None:
    if name is None:
        return None
    if not isinstance(name, str):
        raise BadRecord("'facts' must be a path")
    try:
        return json.loads((root / name).read_text())
    except FileNotFoundError:
        raise BadRecord(f"facts not found: {root / name}") from None
    except json.JSONDecodeError as e:
        raise BadRecord(f"facts {root / name}: invalid JSON ({e.msg})") from None


def read_manifest(path: str | Path) -> list[Record | Skip]:
    """One `Record` or `Skip` per non-blank line, in order; duplicate ids are skipped after the first."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: manifest not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read manifest ({type(e).__name__})") from None
    entries: list[Record | Skip] = []
    seen: set[str] = set()
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadRecord(f"malformed JSON ({e.msg} at column {e.colno})") from None
            record = _record(raw, n, path.parent)
            if record.id in seen:
                raise BadRecord(f"duplicate id {record.id!r}")
            seen.add(record.id)
            entries.append(record)
        except BadRecord as e:
            entries.append(Skip(n, str(e)))
    return entries
