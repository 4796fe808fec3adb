"""Negative context (FilmWeaver §4.2.5): irrelevant frames of another record mixed into a training history.

A model that only ever sees relevant history learns to copy whatever the memory holds. With
probability `data.context.negative.p` a sample's context also holds up to `data.context.negative.frames`
frames of one shot of another record (evenly spaced, each with its own shot's text), placed as one
extra history shot at a random place among the sample's history shots; the shots from there on are
numbered one later. The prompt does not ask for that shot, so the model learns to ignore memory the
text does not point at. A first shot, which has no history, may get the irrelevant shot alone.

The draws are a pure function of (run seed, epoch, sample index): a resumed run, and every rank,
mixes exactly what an uninterrupted run would, and an epoch mixes differently from the last.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from distill.seeds import derive_seed
from student.context import Context
from teacher.context import evenly_spaced


@dataclass(frozen=True)
class NegativeShot:
    """The irrelevant shot of one sample: `record` index, its `shot`, the `frames` taken from it, and
    `place`, the index among the sample's history shots it is inserted before (history length: last)."""

    record: int
    shot: int
    frames: tuple[int, ...]
    place: int


def check_negative(p: float, frames: int) -> None:
    """The negative-context keys, before any compute (ValueError naming the key)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"data.context.negative.p must be in [0, 1], got {p}")
    if frames < 1:
        raise ValueError(f"data.context.negative.frames must be >= 1, got {frames}")


def pick_negative(available: Sequence[Sequence[Sequence[int]]], record: int, history: int, p: float,
                  frames: int, seed: int, epoch: int, index: int) -> NegativeShot | None:
    """The irrelevant shot mixed into sample `index` of record `record` (with `history` shots before its
    target), or None. `available[r][k]` lists the frames of shot k of record r that can be read as context
    frames; the shot comes from a record other than `record`, never the sample's own."""
    if p == 0 or len(available) < 2:
        return None
    rng = random.Random(derive_seed(seed, f"negative-context/{epoch}", index))
    if rng.random() >= p:
        return None
    other = rng.randrange(len(available) - 1)
    other += other >= record  # every record but the sample's own, uniformly
    shot = rng.randrange(len(available[other]))
    pool = available[other][shot]
    chosen = tuple(pool[i] for i in evenly_spaced(len(pool), frames))
    return NegativeShot(other, shot, chosen, rng.randint(0, history))


def insert_shot(context: Context | None, extra: Context, place: int) -> Context:
    """`context` (unbatched) with `extra`, one shot, inserted as history shot `place`: the frames of shots
    before it, then its frames, then the rest, those shots numbered one later."""
    if context is None:
        return Context(extra.latents, extra.texts, torch.full_like(extra.shots, place))
    before = context.shots < place
    after = ~before
    shots = torch.cat([context.shots[before], torch.full_like(extra.shots, place), context.shots[after] + 1])
    return Context(torch.cat([context.latents[:, before], extra.latents, context.latents[:, after]], dim=1),
                   torch.cat([context.texts[before], extra.texts, context.texts[after]]), shots)
