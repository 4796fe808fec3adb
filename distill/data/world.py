"""The synthetic sprite world's facts and caption grammar (no pixels here; see `synth.py`).

A video is one scene: a named background and a cast of 1–3 characters (shape, colour, size), each
(colour, shape) pair unique so a caption names a character unambiguously. Each shot has a framing
(wide / medium / close-up scales the characters), the subset of the cast in view and a motion per
character. Captions are generated from these facts only, so evaluation can check them exactly:

    shot:   "close-up: the red circle moves left and the green square stays still on a blue background"
    global: "a large red circle and a small green square on a blue background"

Caption modes (`data.synth.captions`): `full` names every fact in every caption, so a shot can be
drawn from its text alone; `memory` names colours, sizes and the background only in the first shot
("close-up: the red circle moves left on a blue background"), later shots and the global caption
name shapes and motions only ("medium: the circle moves up"; global "a circle and a square"), so a
later shot's colours can only come from the history. The cast then has distinct shapes, so "the
circle" names one character.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SHAPES = ("circle", "square", "triangle")
# saturated colours far apart in hue, so they survive H.264's chroma subsampling
COLOURS = {"red": (230, 30, 30), "green": (30, 200, 40), "yellow": (240, 220, 20),
           "white": (245, 245, 245), "cyan": (20, 220, 230), "magenta": (230, 30, 220),
           "orange": (250, 140, 10)}
BACKGROUNDS = {"blue": (20, 30, 140), "black": (10, 10, 10), "grey": (110, 110, 110),
               "purple": (80, 20, 110), "brown": (100, 60, 20)}
SIZES = {"small": 0.09, "large": 0.14}          # radius / shorter frame side, at wide framing
FRAMINGS = {"wide": 1.0, "medium": 1.4, "close-up": 1.8}  # scale of the characters
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
CAPTION_MODES = ("full", "memory")


@dataclass
class Character:
    id: int
    shape: str
    colour: str
    size: str

    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class ShotPlan:
    frames: int
    framing: str
    motions: dict[int, str]  # character id → motion, for the characters in view


@dataclass
class ScenePlan:
    background: str
    cast: list[Character]
    shots: list[ShotPlan] = field(default_factory=list)


def _draw_cast(rng: np.random.Generator, size: int, distinct_shapes: bool) -> list[Character]:
    """`size` characters with distinct (colour, shape) pairs, or distinct shapes when asked."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    if distinct_shapes:
        shapes = rng.choice(len(SHAPES), size=size, replace=False)
        pairs = [(str(rng.choice(list(COLOURS))), SHAPES[k]) for k in shapes]
        chosen = range(size)
    else:
        chosen = sorted(rng.choice(len(pairs), size=size, replace=False))
    return [Character(i, pairs[j][1], pairs[j][0], str(rng.choice(list(SIZES)))) for i, j in enumerate(chosen)]


def plan_scene(rng: np.random.Generator, shots: tuple[int, int], frames: tuple[int, int],
               max_cast: int, distinct_shapes: bool = False) -> ScenePlan:
    """Draw a scene: background, cast, and per shot its length, framing, characters in view, motions."""
    background = str(rng.choice(list(BACKGROUNDS)))
    cast_size = int(rng.integers(1, max_cast + 1))
    cast = _draw_cast(rng, cast_size, distinct_shapes)
    plan = ScenePlan(background, cast)
    for _ in range(int(rng.integers(shots[0], shots[1] + 1))):
        in_view = sorted(rng.choice(cast_size, size=int(rng.integers(1, cast_size + 1)), replace=False))
        # no jump cuts: a cut always changes the framing, so it is visible even in a one-character scene
        framings = [f for f in FRAMINGS if not plan.shots or f != plan.shots[-1].framing]
        plan.shots.append(ShotPlan(
            frames=int(rng.integers(frames[0], frames[1] + 1)),
            framing=str(rng.choice(framings)),
            motions={int(i): str(rng.choice(list(MOTIONS))) for i in in_view}))
    return plan


def _action(character: Character, motion: str, named: bool) -> str:
    verb = "stays still" if motion == "still" else f"moves {motion}"
    return f"the {character.name() if named else character.shape} {verb}"


def shot_caption(plan: ScenePlan, shot: ShotPlan, named: bool = True) -> str:
    """A shot's caption; `named` False leaves out colours and the background (memory mode's later shots)."""
    actions = " and ".join(_action(plan.cast[i], m, named) for i, m in shot.motions.items())
    return f"{shot.framing}: {actions} on a {plan.background} background" if named else f"{shot.framing}: {actions}"


def global_caption(plan: ScenePlan, named: bool = True) -> str:
    names = [f"a {c.size} {c.name()}" if named else f"a {c.shape}" for c in plan.cast]
    cast = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{cast} on a {plan.background} background" if named else cast


def captions(plan: ScenePlan, mode: str) -> tuple[str, list[str]]:
    """(global caption, shot captions) of a scene in caption mode `mode` (see module doc)."""
    if mode not in CAPTION_MODES:
        raise ValueError(f"data.synth.captions must be one of {CAPTION_MODES}; got {mode!r}")
    full = mode == "full"
    return global_caption(plan, full), [shot_caption(plan, shot, full or k == 0) for k, shot in enumerate(plan.shots)]


def grammar_texts() -> list[str]:
    """Text fragments holding every word the caption grammar can produce (for the vocabulary)."""
    glue = "a the and on background moves stays still , :"
    return [glue, *FRAMINGS, *SHAPES, *COLOURS, *BACKGROUNDS, *SIZES, *MOTIONS]

