"""Measurements of generated videos against the synthetic world's facts (teacher, student, eval).

Every pixel within `max_distance` (RGB) of a colour of the world's palette (character colours and
backgrounds) is labelled with its nearest one; pixels further from all of them (H.264's blends at
sprite edges, a model's mush) get no label. Everything below is read off these labels, but for the
colours a shot shows, which are read off the solid labels (`solid`: a label kept only where a 3x3
square of it covers the pixel). Uniform noise lands within `max_distance` of each palette colour
for about 1.6% of its pixels, enough to pass `min_share` (it scored 0.2 on colour consistency), and
H.264's chroma subsampling paints a ring of a third colour around a sprite (orange on purple blends
to brown); neither is a surface, and neither survives the square.

Colour consistency (one shot): the colours holding at least `min_share` of all pixels are the shot's
dominant colours; the score is their Jaccard index with the colours the facts say the shot shows (its
background and the colours of the characters in view).

A whole multi-shot video (`score_video`), with the shot lengths it was generated with:

- characters: in each frame, a connected region of one character colour covering at least
  `min_share` of the pixels is a character (two characters may share a colour, never a shape); its
  shape comes from the fill ratio of its bounding box (square 1, circle pi/4, triangle 1/2), its
  position from its centroid. A shot's identities are the (colour, shape) pairs seen in at least
  half its frames (a region occluded or merged in a few frames does not count against it; one the
  world draws under another for most of a shot is unreadable, and the world's own video scores
  below 1 there).
- intra_identity: per shot, the mean Jaccard index of each frame's identities with the shot's (no
  facts needed), over the shots where some character is seen (absent when none is).
- identity_match / inter_identity: Jaccard index of a shot's identities with the facts' characters in
  view, over all shots / over the shots after the first (the ones that depend on history).
- motion_adherence: the fraction of (shot, character in view) whose centroid moves as its caption
  says: the least-squares slope of the track along x and y (pixels per frame), still below
  `motion_tolerance`, else the direction of the larger one.
- intra_change: mean absolute difference of consecutive frames inside shots, in [0, 1] (lower is
  smoother).
- cut_accuracy (shot cut accuracy): the change of a frame is the fraction of pixels whose label
  differs from the previous frame's. A cut is detected at frame t when its change is a local peak, at
  least `cut_min_change`, and at least `cut_ratio` times the median change on either side (the
  `cut_window` frames before it and after it, whichever is larger): motion changes a steady share
  of pixels, a cut changes many at once. True cuts are the first frames of shots 2... Each true cut
  is matched to at most one detection within `cut_tolerance` frames; with m matches, T true cuts and
  D detections, the accuracy is m / (T + D - m): 1 exactly when every cut is found at the right
  frame and nothing else is, lower for missed, misplaced and spurious cuts (1 for a one-shot video
  with no detection). cut_count_accuracy = 1 - |D - T| / T (clipped at 0) judges the count alone.

These read the synthetic world's palette; on real footage only the learned-feature metrics
(distill/eval/features.py) mean anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.data.world import BACKGROUNDS, COLOURS, MOTIONS

MIN_SHARE = 0.005  # a small character at wide framing covers about 1-3% of a frame
MAX_DISTANCE = 40.0  # the prepared tiny world's own shots score 1.0 with these two settings
# Bounding-box fill ratios of the world's shapes as rendered (radius 5-17 px): a square is a whole
# rectangle of pixels (1.0); a circle (pi/4) measures 0.71-0.87 once discretised, a triangle (1/2)
# 0.50-0.60. The boundaries sit between those ranges, not at the ideal values' midpoints.
SQUARE_ABOVE, CIRCLE_ABOVE = 0.93, 0.66


@dataclass(frozen=True)
class SceneSettings:
    """Thresholds of the video metrics: the recipe keys `eval.*` (their defaults live in the schema;
    build with `distill.eval.scoring.scene_settings`) and two fixed constants (see the module doc)."""

    cut_ratio: float
    cut_min_change: float
    cut_window: int
    cut_tolerance: int
    motion_tolerance: float
    min_share: float = MIN_SHARE
    max_distance: float = MAX_DISTANCE


def palette() -> tuple[list[str], torch.Tensor]:
    """Names and RGB values [N, 3] of every colour the synthetic world paints."""
    names = list(COLOURS) + list(BACKGROUNDS)
    rgb = torch.tensor([COLOURS.get(n) or BACKGROUNDS[n] for n in names], dtype=torch.float32)
    return names, rgb


def _check_frames(frames: torch.Tensor) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [F, H, W, 3]; got {list(frames.shape)}")


def label_frames(frames: torch.Tensor, max_distance: float = MAX_DISTANCE) -> torch.Tensor:
    """Palette index [F, H, W] (int8) of every pixel of uint8 frames [F, H, W, 3]; -1 where none is close."""
    _check_frames(frames)
    _, rgb = palette()
    pixels = frames.reshape(-1, 3)
    out = torch.empty(pixels.shape[0], dtype=torch.int8)  # a long video at 832x480 has ~1e8 pixels
    step = 1 << 20  # pixels per block: the [block, N] distance matrix stays small at any frame size
    for a in range(0, pixels.shape[0], step):
        p = pixels[a:a + step].float()
        # |p - c|^2 expanded: one matmul instead of cdist, which is ten times slower on CPU
        squared = (p * p).sum(1, keepdim=True) - 2 * p @ rgb.T + (rgb * rgb).sum(1)
        distance, nearest = squared.min(dim=1)
        out[a:a + step] = torch.where(distance <= max_distance ** 2, nearest, -1).to(torch.int8)
    return out.reshape(frames.shape[:3])


def solid(labels: torch.Tensor) -> torch.Tensor:
    """Labels [F, H, W] kept only where a 3x3 square of one label covers the pixel, -1 elsewhere: a
    morphological opening per label (the frame's border counts as agreeing). Scattered pixels and
    rings under 3 pixels wide go; a sprite keeps its area but for the tips of its corners."""
    out = torch.full_like(labels, -1)
    for value in torch.unique(labels).tolist():
        if value < 0:
            continue
        mask = (labels == value).float().unsqueeze(1)
        core = 1 - torch.nn.functional.max_pool2d(1 - mask, 3, stride=1, padding=1)
        kept = (torch.nn.functional.max_pool2d(core, 3, stride=1, padding=1) * mask).squeeze(1) > 0
        out[kept] = value
    return out


def dominant_colours(frames: torch.Tensor, min_share: float = MIN_SHARE,
                     max_distance: float = MAX_DISTANCE) -> set[str]:
    """Palette colours whose solid labels cover at least `min_share` of uint8 frames [F, H, W, 3]."""
    return labelled_colours(solid(label_frames(frames, max_distance)), min_share)


def labelled_colours(labels: torch.Tensor, min_share: float = MIN_SHARE) -> set[str]:
    """Palette colours covering at least `min_share` of labelled pixels [F, H, W]."""
    names, _ = palette()
    share = torch.bincount(labels[labels >= 0].long(), minlength=len(names)).float() / labels.numel()
    return {names[i] for i in torch.nonzero(share >= min_share).flatten().tolist()}


def expected_colours(facts: dict, shot: int) -> set[str]:
    """The background and the colours of the characters in view in shot `shot`, per the facts."""
    try:
        colour_of = {c["id"]: c["colour"] for c in facts["cast"]}
        in_view = facts["shots"][shot]["characters"]
        return {facts["background"]} | {colour_of[c["id"]] for c in in_view}
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"facts have no usable cast/background for shot {shot} ({e!r})") from None


def colour_consistency(frames: torch.Tensor, facts: dict, shot: int, min_share: float = MIN_SHARE,
                       max_distance: float = MAX_DISTANCE) -> float:
    """Jaccard index between the dominant colours of `frames` and the colours of shot `shot`."""
    got, want = dominant_colours(frames, min_share, max_distance), expected_colours(facts, shot)
    return len(got & want) / len(got | want)


# --------------------------------------------------------------------------- characters


@dataclass(frozen=True)
class Sighting:
    """One character seen in one frame: a connected region of one character colour."""

    colour: str
    shape: str
    x: float  # centroid, pixels
    y: float


def shape_of(mask: torch.Tensor) -> str:
    """The shape whose bounding-box fill ratio fits a boolean mask [H, W] (not empty)."""
    ys, xs = torch.nonzero(mask.any(dim=1)).flatten(), torch.nonzero(mask.any(dim=0)).flatten()
    fill = float(mask.sum()) / ((int(ys[-1] - ys[0]) + 1) * (int(xs[-1] - xs[0]) + 1))
    return "square" if fill >= SQUARE_ABOVE else "circle" if fill >= CIRCLE_ABOVE else "triangle"


def components(masks: torch.Tensor) -> torch.Tensor:
    """8-connected regions of boolean masks [B, H, W]: each pixel gets its region's largest flat
    index + 1 (0 off the mask), by propagating the maximum until nothing changes."""
    b, h, w = masks.shape
    on = masks.float()
    ids = (torch.arange(1, h * w + 1, dtype=torch.float32).reshape(1, h, w) * on).unsqueeze(1)
    while True:
        grown = torch.nn.functional.max_pool2d(ids, 3, stride=1, padding=1) * on.unsqueeze(1)
        if torch.equal(grown, ids):
            return ids[:, 0].long()
        ids = grown


def sightings(labels: torch.Tensor, min_share: float = MIN_SHARE, frames_per_block: int = 16
              ) -> list[list[Sighting]]:
    """Characters of each labelled frame [F, H, W]: connected regions of one character colour covering
    at least `min_share` of the frame (two characters may share a colour; their shapes differ)."""
    names, _ = palette()
    min_pixels = min_share * labels[0].numel()
    out: list[list[Sighting]] = [[] for _ in range(labels.shape[0])]
    # (frame, colour) masks of colours present in a frame; a block's regions are found in one pass
    present = [(f, i) for f in range(labels.shape[0]) for i in range(len(COLOURS))]
    present = [(f, i) for f, i in present if int((labels[f] == i).sum()) >= min_pixels]
    for a in range(0, len(present), frames_per_block * len(COLOURS)):
        block = present[a:a + frames_per_block * len(COLOURS)]
        regions = components(torch.stack([labels[f] == i for f, i in block]))
        for (f, i), region in zip(block, regions):
            ids, counts = torch.unique(region[region > 0], return_counts=True)
            for rid in ids[counts >= min_pixels].tolist():
                mask = region == rid
                ys, xs = torch.nonzero(mask, as_tuple=True)
                out[f].append(Sighting(names[i], shape_of(mask), float(xs.float().mean()) + 0.5,
                                       float(ys.float().mean()) + 0.5))
    return out


def frame_identities(seen: list[Sighting]) -> set[tuple[str, str]]:
    """(colour, shape) of every character of one frame."""
    return {(s.colour, s.shape) for s in seen}


def shot_identities(frames: list[list[Sighting]]) -> set[tuple[str, str]]:
    """(colour, shape) pairs seen in at least half of a shot's frames."""
    counts: dict[tuple[str, str], int] = {}
    for seen in frames:
        for identity in frame_identities(seen):
            counts[identity] = counts.get(identity, 0) + 1
    return {identity for identity, n in counts.items() if 2 * n >= len(frames)}


def jaccard(got: set, want: set) -> float:
    """|got & want| / |got | want|; two empty sets agree (1)."""
    return 1.0 if not got | want else len(got & want) / len(got | want)


def expected_identities(facts: dict, shot: int) -> dict[int, tuple[tuple[str, str], str]]:
    """Character id -> ((colour, shape), motion) of the characters in view in shot `shot`."""
    try:
        cast = {c["id"]: (c["colour"], c["shape"]) for c in facts["cast"]}
        return {c["id"]: (cast[c["id"]], c["motion"]) for c in facts["shots"][shot]["characters"]}
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"facts have no usable cast/characters for shot {shot} ({e!r})") from None


# --------------------------------------------------------------------------- motion


def track_motion(frames: list[list[Sighting]], colour: str, shape: str | None, tolerance: float) -> str | None:
    """The motion (a key of MOTIONS) of a character's centroid over a shot; the character is the one
    region of `colour` (and `shape`, when given: the colour is shared) in a frame. None when it is
    found in fewer than 2 frames."""
    points = []
    for t, seen in enumerate(frames):
        found = [s for s in seen if s.colour == colour and (shape is None or s.shape == shape)]
        if len(found) == 1:
            points.append((t, found[0].x, found[0].y))
    if len(points) < 2:
        return None
    p = torch.tensor(points, dtype=torch.float64)
    t = p[:, 0] - p[:, 0].mean()
    slope = (t[:, None] * (p[:, 1:] - p[:, 1:].mean(dim=0))).sum(dim=0) / (t * t).sum()
    sx, sy = float(slope[0]), float(slope[1])
    if max(abs(sx), abs(sy)) < tolerance:
        return "still"
    step = (1 if sx > 0 else -1, 0) if abs(sx) >= abs(sy) else (0, 1 if sy > 0 else -1)
    return next(name for name, d in MOTIONS.items() if d == step)


# --------------------------------------------------------------------------- cuts


def label_change(labels: torch.Tensor) -> torch.Tensor:
    """[F - 1]: the fraction of pixels whose label differs between frame t and frame t + 1."""
    return (labels[1:] != labels[:-1]).flatten(1).sum(dim=1).float() / labels[0].numel()


def detect_cuts(change: torch.Tensor, s: SceneSettings) -> list[int]:
    """Frames (1 .. F-1) that start a new shot, from the change curve [F - 1] (see module doc)."""
    cuts = []
    n = len(change)
    for i in range(n):
        c = float(change[i])
        before, after = change[max(0, i - s.cut_window):i], change[i + 1:i + 1 + s.cut_window]
        if c < s.cut_min_change or (i > 0 and c < change[i - 1]) or (i + 1 < n and c <= change[i + 1]):
            continue
        base = max([float(side.median()) for side in (before, after) if len(side)] or [0.0])
        if c >= s.cut_ratio * base:
            cuts.append(i + 1)
    return cuts


def shot_cut_accuracy(detected: list[int], true: list[int], tolerance: int) -> float:
    """m / (T + D - m) with m one-to-one matches within `tolerance` frames (see module doc)."""
    free, matched = sorted(detected), 0
    for cut in sorted(true):
        near = [d for d in free if abs(d - cut) <= tolerance]
        if near:
            free.remove(min(near, key=lambda d: abs(d - cut)))
            matched += 1
    union = len(true) + len(detected) - matched
    return 1.0 if union == 0 else matched / union


def cut_count_accuracy(detected: list[int], true: list[int]) -> float:
    """1 - |D - T| / T clipped at 0; without true cuts, 1 only when nothing is detected."""
    if not true:
        return float(not detected)
    return max(0.0, 1.0 - abs(len(detected) - len(true)) / len(true))


# --------------------------------------------------------------------------- a whole video


def shot_bounds(lengths: list[int]) -> list[tuple[int, int]]:
    """[start, end) frames of consecutive shots of `lengths` frames."""
    starts = [sum(lengths[:k]) for k in range(len(lengths))]
    return [(a, a + n) for a, n in zip(starts, lengths)]


def score_video(frames: torch.Tensor, shot_lengths: list[int], facts: dict | None,
                s: SceneSettings) -> dict[str, float]:
    """The module doc's metrics of one video (uint8 [F, H, W, 3], shots of `shot_lengths` frames);
    those needing facts only with facts, inter_identity only for two shots or more, intra_identity
    only when some character is seen."""
    _check_frames(frames)
    if sum(shot_lengths) != frames.shape[0] or min(shot_lengths, default=0) < 1:
        raise ValueError(f"shot lengths {shot_lengths} do not cover the video's {frames.shape[0]} frames")
    labels = label_frames(frames, s.max_distance)
    seen = sightings(labels, s.min_share)
    bounds = shot_bounds(shot_lengths)
    shots = [seen[a:b] for a, b in bounds]
    identities = [shot_identities(shot) for shot in shots]
    # shots where no character is ever seen are left out: empty frames are not "consistent"
    intra = [sum(jaccard(frame_identities(f), ids) for f in shot) / len(shot)
             for shot, ids in zip(shots, identities) if any(shot)]
    inside = torch.ones(frames.shape[0] - 1, dtype=torch.bool)
    inside[[a - 1 for a, _ in bounds[1:]]] = False
    pixel_change = torch.stack([(frames[t + 1].float() - frames[t].float()).abs().mean() / 255
                                for t in range(frames.shape[0] - 1)]) if frames.shape[0] > 1 else torch.zeros(0)
    detected, true = detect_cuts(label_change(labels), s), [a for a, _ in bounds[1:]]
    out = {"intra_change": float(pixel_change[inside].mean()) if bool(inside.any()) else 0.0,
           "cut_accuracy": shot_cut_accuracy(detected, true, s.cut_tolerance),
           "cut_count_accuracy": cut_count_accuracy(detected, true)}
    if intra:
        out["intra_identity"] = sum(intra) / len(intra)
    if facts is not None:
        out.update(fact_scores(labels, shots, identities, bounds, facts, s))
    return out


def fact_scores(labels: torch.Tensor, shots: list[list[list[Sighting]]], identities: list[set[tuple[str, str]]],
                bounds: list[tuple[int, int]], facts: dict, s: SceneSettings) -> dict[str, float]:
    """identity_match, inter_identity, motion_adherence and colour_consistency against the facts."""
    if not isinstance(facts.get("shots"), list) or len(facts["shots"]) < len(shots):
        raise ValueError(f"facts describe {len(facts.get('shots') or [])} shots; the video has {len(shots)}")
    matches, moves, colours = [], [], []
    for k, (shot, ids, (a, b)) in enumerate(zip(shots, identities, bounds)):
        want = expected_identities(facts, k)
        matches.append(jaccard(ids, {identity for identity, _ in want.values()}))
        in_view = [colour for (colour, _), _ in want.values()]
        for (colour, shape), motion in want.values():
            track = track_motion(shot, colour, shape if in_view.count(colour) > 1 else None, s.motion_tolerance)
            moves.append(float(track == motion))
        got = labelled_colours(solid(labels[a:b]), s.min_share)
        colours.append(jaccard(got, expected_colours(facts, k)))
    out = {"identity_match": sum(matches) / len(matches), "motion_adherence": sum(moves) / max(len(moves), 1),
           "colour_consistency": sum(colours) / len(colours)}
    if len(matches) > 1:
        out["inter_identity"] = sum(matches[1:]) / (len(matches) - 1)
    return out
