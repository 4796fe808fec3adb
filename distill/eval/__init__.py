"""Evaluation: scoring generated multi-shot videos, per stage, and the probes stages run while training.

- `metrics.py` (synthetic-world measurements), `features.py` (CLIP / DINO consistency),
  `media.py` (GIF and histogram summaries), `compare.py` (the runs' comparison table);
- `scoring.py` (generate, time and score videos; the report), `makers.py` (the teacher as a video maker),
  `stages.py` (every listed stage of a run scored on the same prompts and seeds);
- `multishot.py` (student and teacher multi-shot rollouts on their own history), `probes.py` (the
  in-training probes).
"""
