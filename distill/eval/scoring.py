"""Evaluate a model that makes multi-shot videos: generate the prompts' videos, time them, score them.

Each prompt is generated shot by shot by a `StreamingGenerator` on the export (global caption as its
global prompt, seed `seed + i` for prompt i), exactly as serving runs it, with each shot at the
export's training length. Throughput is measured around the generator only: `fps` = all frames /
all generation seconds, `latency_s` = the median over videos of the time from the first shot's
request to its first decoded chunk. Each video is scored by `distill.eval.metrics.score_video` (facts
metrics only for prompts that carry facts) and, when configured, by a CLIP/DINO feature model
(`distill.eval.features`). Outputs, in the output folder: `samples/NNNN.mp4`, `report.json` (per video
metrics and timings, the metrics skipped and why) and, when asked, TensorBoard scalars `eval/<name>`;
the averaged metrics are returned (the caller writes them to `metrics.json`). Other model kinds (the
teacher: distill/eval/makers.py) plug their own `VideoMaker` into the same `score_videos` loop.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from distill.eval.metrics import SceneSettings, score_video
from teacher.encoders import DTYPES

FACT_METRICS = ("identity_match", "inter_identity", "motion_adherence", "colour_consistency")


@dataclass(frozen=True)
class Prompt:
    """One multi-shot prompt: its captions and, for the synthetic world, the facts they come from."""

    id: str
    global_caption: str
    captions: list[str]
    facts: dict | None = None


def _prompt_line(raw: object, where: str) -> Prompt:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a prompt must be a JSON object")
    shots = raw.get("shots")
    if not isinstance(shots, list) or not shots:
        raise ValueError(f"{where}: 'shots' must be a non-empty list of {{\"caption\": ...}}")
    captions = [s.get("caption") if isinstance(s, dict) else None for s in shots]
    if not all(isinstance(c, str) and c.strip() for c in captions):
        raise ValueError(f"{where}: every shot needs a non-empty 'caption'")
    facts = raw.get("facts")
    if facts is not None and (not isinstance(facts, dict) or not isinstance(facts.get("shots"), list)
                              or len(facts["shots"]) < len(captions) or "cast" not in facts):
        raise ValueError(f"{where}: 'facts' must hold 'cast' and one entry of 'shots' per shot")
    glob = raw.get("global_caption", "")
    if not isinstance(glob, str):
        raise ValueError(f"{where}: 'global_caption' must be a string")
    return Prompt(str(raw.get("id", where)), glob, captions, facts)


def load_prompts(path: str | Path) -> list[Prompt]:
    """Prompts of a JSONL file (see module doc); a bad line fails naming file and line."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: prompts file not found") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        prompts.append(_prompt_line(raw, f"{path}:{n}"))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def prepared_prompts(folder: str | Path) -> list[Prompt]:
    """The captions (and facts) of a prepared folder's records, in index order."""
    from distill.data.datasets import PreparedData

    return [Prompt(r["id"], r["global_caption"], list(r["captions"]), r.get("facts"))
            for r in PreparedData(folder).records]


@dataclass
class Video:
    frames: torch.Tensor  # uint8 [F, H, W, 3]
    shot_lengths: list[int]
    first_chunk_s: float
    seconds: float


# (prompt, seed) -> the prompt's multi-shot video, timed around generation only
VideoMaker = Callable[[Prompt, int], Video]


def generate_video(student, codec, text_encoder, video, prompt: Prompt, seed: int) -> Video:
    """All shots of `prompt`, streamed shot by shot; seconds count generation only."""
    from student.generator import StreamingGenerator

    gen = StreamingGenerator(student, codec, text_encoder, video, global_prompt=prompt.global_caption, seed=seed)
    chunks, lengths, first = [], [], None
    start = time.perf_counter()
    for caption in prompt.captions:
        made = 0
        for chunk in gen.next_shot(caption):
            first = time.perf_counter() - start if first is None else first
            chunks.append(chunk)
            made += chunk.shape[0]
        lengths.append(made)
    seconds = time.perf_counter() - start
    return Video(torch.cat(chunks), lengths, first, seconds)


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


def evaluate(export: str | Path, prompts: list[Prompt], out: str | Path, ev, device: str | torch.device,
             seed: int, tb_dir: Path | None = None, rank: int = 0, world: int = 1) -> dict[str, float]:
    """Generate, time and score the prompts with the export (`ev`: the recipe's `eval` section), prompt
    i on rank i % world; rank 0 gathers the results, writes report.json (and, with tb_dir,
    TensorBoard scalars) and returns the means, other ranks return {}. Samples go to out/samples/."""
    from student.export import load_student, read_export
    from student.generator import load_components

    info = read_export(export)
    codec, text, video = load_components(info.components, info.folder, device)
    student = load_student(info.folder, torch_dtype=DTYPES[ev.dtype]).to(device)
    make = lambda prompt, s: generate_video(student, codec, text, video, prompt, s)  # noqa: E731
    return score_videos(make, video.fps, prompts, out, ev, device, seed, tb_dir, rank, world,
                        {"export": str(info.folder)})


def score_videos(make: VideoMaker, fps: float, prompts: list[Prompt], out: str | Path, ev,
                 device: str | torch.device, seed: int, tb_dir: Path | None, rank: int, world: int,
                 source: dict) -> dict[str, float]:
    """The scoring loop every model kind shares: `make(prompt, seed + i)` for this rank's prompts,
    score, save the mp4 (at `fps`), gather; rank 0 writes report.json (`source` names the model) and
    returns the means (other ranks {})."""
    from distill.checkpoint import write_atomic
    from distill.eval.features import FeatureExtractor

    out = Path(out)
    kind = ev.features.kind
    extractor = None if kind == "none" else FeatureExtractor(kind, ev.features.path, device, ev.features.batch)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    mine = [_evaluate_one(i, prompts[i], make, fps, extractor, ev, seed, out)
            for i in range(rank, len(prompts), world)]
    records = sorted(_gather(mine, world), key=lambda r: r["index"])
    if rank != 0:
        return {}
    frames = sum(sum(r["shot_frames"]) for r in records)
    metrics = {**mean_metrics([r["metrics"] for r in records]), "fps": frames / sum(r["seconds"] for r in records),
               "latency_s": statistics.median(r["first_chunk_s"] for r in records)}
    report = {**source, "device": str(device), "dtype": ev.dtype, "metrics": metrics,
              "skipped": skipped_metrics(prompts, kind, metrics), "videos": records}
    write_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    if tb_dir is not None:
        log_scalars(tb_dir, metrics)
    return metrics


def _evaluate_one(i: int, prompt: Prompt, make: VideoMaker, fps: float, extractor, ev, seed: int,
                  out: Path) -> dict:
    """Generate, score and save prompt i; its report record."""
    from distill.eval.features import feature_consistency
    from student.video import write_mp4

    v = make(prompt, seed + i)
    scores = score_video(v.frames, v.shot_lengths, prompt.facts, scene_settings(ev))
    if extractor is not None:
        scores.update(feature_consistency(extractor.embed(v.frames), v.shot_lengths, extractor.kind))
    sample = out / "samples" / f"{i:04d}.mp4"
    write_mp4(sample, v.frames.numpy(), fps)
    return {"index": i, "id": prompt.id, "sample": str(sample.relative_to(out)), "shot_frames": v.shot_lengths,
            "first_chunk_s": v.first_chunk_s, "seconds": v.seconds, "metrics": scores}


def _gather(mine: list[dict], world: int) -> list[dict]:
    """Every rank's records (JSON-able dicts), on every rank."""
    if world == 1:
        return mine
    import torch.distributed as dist

    parts: list = [None] * world
    dist.all_gather_object(parts, mine)
    return [r for part in parts for r in part]


def log_scalars(tb_dir: Path, metrics: dict[str, float]) -> None:
    """`eval/<name>` at step 1; a re-evaluation into the same folder replaces the earlier points."""
    from distill.logging import StageLogger

    logger = StageLogger(tb_dir, "eval", main=True, tensorboard=True, progress=False, total_steps=1, start_step=0)
    logger.scalars(1, metrics)
    logger.close()


def resolve_export(source: str | Path, work: str | Path) -> Path:
    """The export to evaluate: `source` itself when it is one, else the run folder's export/, else
    the run's newest finished student exported into `work`/export."""
    from distill.stages.export import export_run
    from student.export import GENERATOR_FILE

    source = Path(source)
    for folder in (source, source / "export"):
        if (folder / GENERATOR_FILE).is_file():
            return folder
    Path(work).mkdir(parents=True, exist_ok=True)
    return export_run(source, Path(work) / "export")


def select_prompts(ev, prepared: Path) -> list[Prompt]:
    """`eval.prompts` (JSONL) or the prepared records, the first `eval.videos` of them (0: all)."""
    prompts = load_prompts(ev.prompts) if ev.prompts else prepared_prompts(prepared)
    return first(prompts, ev.videos, ev.prompts or prepared)


def first(prompts: list[Prompt], count: int, source: str | Path) -> list[Prompt]:
    """The first `count` prompts (0: all); ValueError naming `source` when there are none."""
    if not prompts:
        raise ValueError(f"{source}: no prompts to evaluate")
    return prompts[:count] if count else prompts
