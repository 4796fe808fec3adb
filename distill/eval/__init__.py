"""Evaluation: scoring generated multi-shot videos, per stage, and the probes stages run while training.

- `run.py` (`EvalRun`: settings, device, seed, rank and folders of one evaluation) and `split.py` (the one
  padded split of items over ranks, every rank as many: ZeRO-3 safe);
- `prompts.py` (prompts of a JSONL file or a prepared folder), `makers.py` (the video-maker protocol:
  a student export, a teacher stage), `scoring.py` (generate, time and score videos; report.json),
  `stages.py` (a run's final student and every stage of `eval.stages`: the eval stage and
  `shotdistill eval` both run it), `strips.py` (a PNG per story, a row per evaluated model),
  `hparams.py` (the eval stage's HParams session: the keys of the stages it scores);
- `multishot.py` (student and teacher multi-shot rollouts on their own history), `probes.py` (the
  in-training probes of the teacher, causal-init and DMD stages);
- `metrics.py` (synthetic-world measurements), `features.py` (CLIP / DINO consistency), `media.py`
  (image, GIF and histogram summaries), `compare.py` (the runs' comparison table).
"""
