"""Score a model's multi-shot videos: generate the prompts' videos, time them, score them, report.

Any `VideoMaker` (distill/eval/makers.py: a student export, a teacher stage) makes prompt i with seed
`seed + i`. Throughput is measured around the maker only: `fps` = all frames / all generation
seconds, `latency_s` = the median over videos of the time from the first shot's request to its first
decoded chunk. Each video is scored by `distill.eval.metrics.score_video` (facts metrics only for
prompts that carry facts) and, when configured, by a CLIP/DINO feature model
(`distill.eval.features`). Outputs, in the run's output folder: `samples/NNNN.mp4` and `report.json`
(per video metrics and timings, the metrics skipped and why); the averaged metrics are returned (the
caller writes them to `metrics.json` and TensorBoard). Ranks split the prompts with the one padded
split (distill/eval/split.py); a rank's padding is not generated (the makers run plain modules).
"""

from __future__ import annotations

import json
import statistics

from distill.eval.makers import VideoMaker
from distill.eval.metrics import SceneSettings, score_video
from distill.eval.prompts import Prompt
from distill.eval.run import EvalRun

FACT_METRICS = ("identity_match", "inter_identity", "motion_adherence", "colour_consistency")


def mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Each metric averaged over the videos that have it."""
    names = list(dict.fromkeys(k for row in rows for k in row))
    return {k: sum(r[k] for r in rows if k in r) / sum(k in r for r in rows) for k in names}


def skipped_metrics(prompts: list[Prompt], features: str, metrics: dict[str, float]) -> dict[str, str]:
    """Metrics not computed for any or some videos, and why."""
    skipped = {}
    if "intra_identity" not in metrics:
        skipped["intra_identity"] = "no character was seen in any video"
    with_facts = sum(p.facts is not None for p in prompts)
    if with_facts < len(prompts):
        why = "no prompt carries facts" if with_facts == 0 else \
            f"only {with_facts} of {len(prompts)} prompts carry facts (averaged over those)"
        skipped.update({name: why for name in FACT_METRICS})
    if "inter_identity" not in metrics and "identity_match" in metrics:
        skipped["inter_identity"] = "every prompt with facts has a single shot"
    if features == "none":
        skipped["features"] = "eval.features.kind is none"
    return skipped


def scene_settings(ev) -> SceneSettings:
    """The metric thresholds of an `eval` recipe section."""
    return SceneSettings(cut_ratio=ev.cut_ratio, cut_min_change=ev.cut_min_change, cut_window=ev.cut_window,
                         cut_tolerance=ev.cut_tolerance, motion_tolerance=ev.motion_tolerance)


def score_videos(make: VideoMaker, prompts: list[Prompt], run: EvalRun) -> dict[str, float]:
    """The scoring loop every model kind shares: `make(prompt, run.seed + i)` for this rank's prompts,
    score, save the mp4 (at `make.fps`) under run.out, gather; rank 0 writes report.json (`make.source`
    names the model) and returns the means (other ranks {})."""
    from distill.eval.features import FeatureExtractor
    from teacher.files import write_atomic

    ev, out = run.ev, run.out
    kind = ev.features.kind
    extractor = None if kind == "none" else FeatureExtractor(kind, ev.features.path, run.device, ev.features.batch)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    mine = [_evaluate_one(i, prompts[i], make, extractor, run) for i, weight in run.share(len(prompts)) if weight]
    records = sorted(_gather(mine, run.world), key=lambda r: r["index"])
    if not run.is_main:
        return {}
    frames = sum(sum(r["shot_frames"]) for r in records)
    metrics = {**mean_metrics([r["metrics"] for r in records]), "fps": frames / sum(r["seconds"] for r in records),
               "latency_s": statistics.median(r["first_chunk_s"] for r in records)}
    report = {**make.source, "device": str(run.device), "dtype": ev.dtype, "metrics": metrics,
              "skipped": skipped_metrics(prompts, kind, metrics), "videos": records}
    write_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    return metrics


def _evaluate_one(i: int, prompt: Prompt, make: VideoMaker, extractor, run: EvalRun) -> dict:
    """Generate, score and save prompt i; its report record."""
    from distill.eval.features import feature_consistency
    from student.video import write_mp4

    v = make(prompt, run.seed + i)
    scores = score_video(v.frames, v.shot_lengths, prompt.facts, scene_settings(run.ev))
    if extractor is not None:
        scores.update(feature_consistency(extractor.embed(v.frames), v.shot_lengths, extractor.kind))
    sample = run.out / "samples" / f"{i:04d}.mp4"
    write_mp4(sample, v.frames.numpy(), make.fps)
    return {"index": i, "id": prompt.id, "sample": str(sample.relative_to(run.out)), "shot_frames": v.shot_lengths,
            "first_chunk_s": v.first_chunk_s, "seconds": v.seconds, "metrics": scores}


def _gather(mine: list[dict], world: int) -> list[dict]:
    """Every rank's records (JSON-able dicts), on every rank."""
    if world == 1:
        return mine
    import torch.distributed as dist

    parts: list = [None] * world
    dist.all_gather_object(parts, mine)
    return [r for part in parts for r in part]
