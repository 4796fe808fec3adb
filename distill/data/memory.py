"""The student settings of the ranked context strategies (retrieval, memory_pack; student/memory.py);
the rule itself is built by distill/data/components.py `memory_rule`.

The oracle scorer's vocabulary is the synthetic world's fact words (colours, shapes, backgrounds):
the student stores it in its settings, so the generator ranks its history as training did.
"""

from __future__ import annotations

from omegaconf import DictConfig

from distill.data.world import BACKGROUNDS, COLOURS, SHAPES
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
