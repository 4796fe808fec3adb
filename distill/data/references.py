"""Trained references (FilmWeaver's multi-concept injection): crops of a shot's own characters in its context.

At inference `StreamingGenerator(references=...)` puts reference images in the global cache before the
history, as the frames of a virtual shot −1, each with the global prompt ⊕ its own caption
(student/generator.py). So that the model is trained for them, with probability
`data.context.references.p` a training sample's context starts with up to `data.context.references.max`
references of its target shot's own characters, laid out exactly that way; they take global-cache
slots, so the history is picked with the budget less the references (always one slot is left for it).

A reference is the character's square box (centre ± radius, clamped to the frame) in the shot's first
frame, resized (nearest) to the video size, as an inference reference image must be, and encoded as a
one-frame clip by the codec; its caption is "the <colour> <shape>". Boxes come from a record's facts
in the synthetic world's format (`shots[j].characters[*].start/radius`, `cast`, `height`/`width`);
a record without them gets no references. Preparation stores them only when `p` > 0.

The draws are a pure function of (run seed, epoch, sample index), like negative context.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F

from distill.seeds import derive_seed


def check_references(p: float, most: int) -> None:
    """The reference keys, before any compute (ValueError naming the key)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"data.context.references.p must be in [0, 1], got {p}")
    if most < 1:
        raise ValueError(f"data.context.references.max must be >= 1, got {most}")


def reference_caption(character: dict) -> str:
    """What a reference of `character` (a facts `cast` entry) is shown with."""
    return f"the {character['colour']} {character['shape']}"


def reference_boxes(facts: dict | None, shot: int, height: int, width: int) -> list[tuple[str, tuple[int, int, int, int]]]:
    """(caption, (top, bottom, left, right)) of each character in view in shot `shot`'s first frame, in
    pixels of a `height` x `width` frame; [] without synthetic-world facts for that shot."""
    if not facts or "cast" not in facts or shot >= len(facts.get("shots", [])):
        return []
    sy, sx = height / facts["height"], width / facts["width"]
    cast = {c["id"]: c for c in facts["cast"]}
    boxes = []
    for ch in facts["shots"][shot].get("characters", []):
        (cx, cy), r = ch["start"], ch["radius"]
        top, bottom = max(0, int(np.floor((cy - r) * sy))), min(height, int(np.ceil((cy + r) * sy)) + 1)
        left, right = max(0, int(np.floor((cx - r) * sx))), min(width, int(np.ceil((cx + r) * sx)) + 1)
        if bottom > top and right > left:
            boxes.append((reference_caption(cast[ch["id"]]), (top, bottom, left, right)))
    return boxes


def crop_reference(frame: np.ndarray, box: tuple[int, int, int, int]) -> torch.Tensor:
    """uint8 [H, W, 3]: the `box` region of `frame` [H, W, 3] resized (nearest) to the frame's size."""
    top, bottom, left, right = box
    region = torch.from_numpy(np.ascontiguousarray(frame[top:bottom, left:right])).permute(2, 0, 1)[None]
    return F.interpolate(region.float(), size=frame.shape[:2], mode="nearest-exact")[0].permute(1, 2, 0).to(torch.uint8)


def pick_references(available: int, p: float, most: int, budget: int, seed: int, epoch: int,
                    index: int) -> tuple[int, ...]:
    """Which of the target shot's `available` references sample `index` gets this epoch (sorted; () for
    none): with probability p, min(most, available, budget − 1) of them, drawn without replacement."""
    count = min(most, available, budget - 1)
    if p == 0 or count < 1:
        return ()
    rng = random.Random(derive_seed(seed, f"references/{epoch}", index))
    if rng.random() >= p:
        return ()
    return tuple(sorted(rng.sample(range(available), count)))
