"""The ranked context strategies (retrieval, memory_pack; student/memory.py) built from a recipe.

The oracle scorer's vocabulary is the synthetic world's fact words (colours, shapes, backgrounds):
the student stores it in its settings, so the generator ranks its history as training did.
"""

from __future__ import annotations

from omegaconf import DictConfig

from distill.data.world import BACKGROUNDS, COLOURS, SHAPES
from student.memory import MemoryRule, similarity_from
from teacher.context import RANKED

WORLD_TERMS = [*COLOURS, *SHAPES, *BACKGROUNDS]


def memory_settings(cfg: DictConfig) -> dict:
    """The student settings of `data.context`'s ranked strategies (StudentSettings fields; none for the
    frame-count strategies, whose students keep the defaults)."""
    c = cfg.data.context
    if c.strategy not in RANKED:
        return {}
    return {"similarity": c.similarity.kind, "similarity_path": c.similarity.path,
            "similarity_terms": list(WORLD_TERMS) if c.similarity.kind == "oracle" else [],
            "pack_frames": c.pack_frames, "max_candidates": c.max_candidates}


def memory_rule(cfg: DictConfig) -> MemoryRule | None:
    """The recipe's ranked rule, or None for the frame-count strategies (dynamic, first, first_last)."""
    c = cfg.data.context
    if c.strategy not in RANKED:
        return None
    s = memory_settings(cfg)
    scorer = similarity_from(s["similarity"], s["similarity_path"], s["similarity_terms"])
    return MemoryRule(c.strategy, c.budget, scorer, c.pack_frames, c.max_candidates)
