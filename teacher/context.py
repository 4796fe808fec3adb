"""Which history frames condition the next shot (ShotStream §4.1, Table 3): a pure function.

Strategies, given the pixel-frame counts of the S_hist history shots and a budget of context frames:

- ``dynamic`` (ShotStream): ⌊budget / S_hist⌋ frames from every history shot, and the remainder
  (budget mod S_hist) also to the most recent shot. With budget 6: S_hist = 1 → [6], 2 → [3, 3],
  3 → [2, 2, 2], 4 → [1, 1, 1, 3], 5 → [1, 1, 1, 1, 2]; beyond the budget only the most recent
  shot keeps frames.
- ``first``: the first frame of every history shot (the budget is not used).
- ``first_last``: the first and last frame of every history shot.
- ``retrieval`` (FilmWeaver) and ``memory_pack`` (STAGE) rank frames by their similarity to the new
  shot's prompt, so they are not frame counts: student/memory.py picks them. Their candidates are
  ``candidate_frames``: ``budget`` evenly spaced frames of every history shot (one shot can fill the
  budget alone), the newest ``max_candidates`` of them over the whole history.

Inside a shot of n frames, k frames are taken evenly spaced with both ends included:
index_i = round(i · (n - 1) / (k - 1)) for i = 0..k-1 (halves round up), k = 1 takes the first
frame (the one right after the cut, as ``first`` does), and k ≥ n takes every frame. A shot never
gives more frames than it has, so a short history may fill less than the budget.

Frames are pixel-frame indices inside the shot: with Wan's VAE each one is encoded on its own as a
one-frame video; with a temporal factor of 1 they are simply the shot's latent frames.
"""

from __future__ import annotations

from typing import Sequence

STRATEGIES = ("dynamic", "first", "first_last", "retrieval", "memory_pack")
# strategies that rank candidate frames by similarity to the prompt (student/memory.py)
RANKED = ("retrieval", "memory_pack")
# how a shot's captions become its model text: each caption encoded on its own (ours), or the whole
# prompt so far as one string (the official ShotStream teacher; teacher/encoders.py)
CAPTION_LAYOUTS = ("separate", "joint")


def evenly_spaced(n: int, k: int) -> list[int]:
    """k frame indices of a shot with n frames, evenly spaced, first and last included."""
    if n < 1:
        raise ValueError(f"a shot needs at least one frame, got {n}")
    if k <= 0:
        return []
    if k >= n:
        return list(range(n))
    if k == 1:
        return [0]
    return [(2 * i * (n - 1) + (k - 1)) // (2 * (k - 1)) for i in range(k)]


def frames_per_shot(history: int, strategy: str, budget: int) -> list[int]:
    """How many frames each of `history` shots contributes (before capping by shot length)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown context strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if budget < 0:
        raise ValueError(f"context budget must be >= 0, got {budget}")
    if strategy in RANKED:
        raise ValueError(f"context strategy {strategy!r} ranks frames by similarity: pick them with "
                         "student/memory.py, not by frame counts")
    if history == 0:
        return []
    if strategy == "first":
        return [1] * history
    if strategy == "first_last":
        return [2] * history
    each, rest = divmod(budget, history)
    return [each] * (history - 1) + [each + rest]


def sample_context(shot_lengths: Sequence[int], strategy: str, budget: int,
                   limit: int | None = None) -> list[tuple[int, int]]:
    """(history shot index, frame index in that shot) of every context frame, in time order; with
    `limit`, only the newest `limit` of them (a global cache with fewer slots than the rule picks)."""
    picks: list[tuple[int, int]] = []
    for shot, (n, k) in enumerate(zip(shot_lengths, frames_per_shot(len(shot_lengths), strategy, budget))):
        picks.extend((shot, frame) for frame in evenly_spaced(n, k))
    if limit is not None:
        return picks[max(0, len(picks) - limit):] if limit > 0 else []
    return picks


def candidate_frames(n: int, strategy: str, budget: int) -> list[int]:
    """Every frame index of an n-frame shot that `strategy` may pick for some history length.

    Preparation encodes exactly these frames one by one (Wan), so any history length is served.
    The ranked strategies may pick any `budget` evenly spaced frames of a shot.
    """
    if strategy in RANKED:
        return evenly_spaced(n, budget)
    counts = {k for s in range(1, budget + 2) for k in frames_per_shot(s, strategy, budget)}
    return sorted({f for k in counts for f in evenly_spaced(n, k)})


def joint_caption(global_caption: str, captions: Sequence[str]) -> str:
    """The official teacher's one-string prompt up to the last of `captions`:
    `<global> shot0: <c0> shot1: <c1> ...`."""
    return " ".join([global_caption.strip()] + [f"shot{i}: {c.strip()}" for i, c in enumerate(captions)]).strip()
