"""What, besides the weights, defines what a causal student computes: saved in every student folder.

The defaults here are the only ones: the recipe schema (distill/config.py, section `student`) takes
its defaults from this class, and the recipe builds the settings with `distill.models.student_settings`.
Light on purpose (no torch): the schema imports it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from teacher.context import CAPTION_LAYOUTS, STRATEGIES

INDICATORS = ("rope_offset", "learnable", "none")
SIMILARITIES = ("oracle", "clip")
# settings added after folders were first saved: a folder without them has their defaults
LATER = ("similarity", "similarity_path", "similarity_terms", "pack_frames", "max_candidates", "local_compression")
# what the unconditional (CFG negative) text replaces: every frame's text, or the target's only
NEGATIVE_SCOPES = ("all", "target")


@dataclass
class StudentSettings:
    """Everything besides the weights that defines what the student computes (saved with exports)."""

    chunk_frames: int = 3
    local_chunks: int = 7
    context_frames: int = 6  # the global cache's size: the context budget
    context_strategy: str = "dynamic"
    indicator: str = "rope_offset"
    theta: float = 1.0 / 6.0
    captions: str = "multi"
    caption_layout: str = "separate"  # how a shot's model text is built (teacher/context.py CAPTION_LAYOUTS)
    denoising_steps: list[float] = field(default_factory=lambda: [1000.0, 750.0, 500.0, 250.0])
    shift: float = 5.0
    # the ranked strategies (retrieval, memory_pack; student/memory.py): scorer, its folder or vocabulary,
    # packed slots and the candidate frames kept
    similarity: str = "oracle"
    similarity_path: str = ""
    similarity_terms: list[str] = field(default_factory=list)
    pack_frames: int = 2
    max_candidates: int = 64
    # compressed local memory (student/compression.py): a pooling kernel per past local chunk, newest
    # first; empty: the local chunks are kept whole
    local_compression: list[int] = field(default_factory=list)

    def check(self) -> "StudentSettings":
        """Raise ValueError naming the first bad setting."""
        if self.indicator not in INDICATORS:
            raise ValueError(f"student indicator must be one of {list(INDICATORS)}; got {self.indicator!r}")
        if self.context_strategy not in STRATEGIES:
            raise ValueError(f"student context_strategy must be one of {list(STRATEGIES)}; "
                             f"got {self.context_strategy!r}")
        if self.caption_layout not in CAPTION_LAYOUTS:
            raise ValueError(f"student caption_layout must be one of {list(CAPTION_LAYOUTS)}; "
                             f"got {self.caption_layout!r}")
        if self.captions not in ("multi", "target_only"):
            raise ValueError(f"student captions must be 'multi' or 'target_only'; got {self.captions!r}")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"student similarity must be one of {list(SIMILARITIES)}; got {self.similarity!r}")
        for name in ("chunk_frames", "local_chunks", "context_frames", "pack_frames", "max_candidates"):
            low = 0 if name in ("local_chunks", "context_frames") else 1
            if int(getattr(self, name)) < low:
                raise ValueError(f"student {name} must be >= {low}; got {getattr(self, name)}")
        self.local_compression = self._checked_compression()
        steps = [float(t) for t in self.denoising_steps]
        if not steps or any(not 0 < t <= 1000 for t in steps) or steps != sorted(steps, reverse=True):
            raise ValueError(f"student denoising_steps must be descending timesteps in (0, 1000]; got {steps}")
        self.denoising_steps = steps
        return self

    def _checked_compression(self) -> list[int]:
        """The local compression kernels as ints: one per local chunk, >= 1, each dividing the next."""
        kernels = [int(k) for k in self.local_compression]
        if kernels and len(kernels) != int(self.local_chunks):
            raise ValueError(f"student local_compression needs one kernel per local chunk ({self.local_chunks}, "
                             f"local_chunks); got {kernels}")
        if any(k < 1 for k in kernels) or any(b % a for a, b in zip(kernels, kernels[1:])):
            raise ValueError(f"student local_compression kernels must be >= 1, newest first, each dividing the "
                             f"next; got {kernels}")
        return kernels

    @property
    def window_chunks(self) -> int:
        """Chunks a target chunk attends to (itself included), the full-sequence equivalent of the cache."""
        return self.local_chunks + 1

    @property
    def position_theta(self) -> float:
        return self.theta if self.indicator == "rope_offset" else 0.0

    def to_dict(self) -> dict:
        """The settings as plain JSON values."""
        return json.loads(json.dumps(asdict(self)))


def settings_from_dict(values: dict, source: str | Path) -> StudentSettings:
    """StudentSettings from saved values; unknown or missing keys name the file."""
    known = set(StudentSettings.__dataclass_fields__)
    unknown, missing = sorted(set(values) - known), sorted(known - set(values) - set(LATER))
    if unknown:
        raise ValueError(f"{source}: unknown student settings {unknown}; valid: {sorted(known)}")
    if missing:
        raise ValueError(f"{source}: missing student settings {missing}")
    return StudentSettings(**values).check()
