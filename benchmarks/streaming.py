"""Streaming benchmark on CPU with the tiny recipes' model: is generation bounded, and how much faster than the teacher?

1. Per chunk, chunk 2 vs chunk 40 (0-based) of one long multi-shot rollout: wall time (minimum and
   median over `--repeats` rollouts, each from `reset()`; the minimum is the least disturbed by
   other work on a shared CPU), the peak
   of bytes allocated during the chunk above its start (torch profiler's CPU allocator events,
   `profile_memory=True`, the allocation timeline torch's memory-timeline export is built from),
   and the generator's persistent state (KV-cache buffer + kept history tensors). Shots have
   `--shot-chunks` chunks (default 2), so that both chunks open a shot (text encoding and the
   global-cache rebuild included) with a full global cache: the same work, 1 vs 20 shots deep.
2. Per shot, same weights: the student's few steps (chunk by chunk, through the KV cache) vs the
   bidirectional teacher sampling the same shot with the same context in `--teacher-steps` Euler
   steps with classifier-free guidance (two passes per step). Both include text encoding and decoding.

The model is the tiny teacher recipe's random Wan (model.*, codec, text encoder, data.*), the student
settings those of the tiny causal-init recipe. Run: python benchmarks/streaming.py [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from distill.config import load_recipe
from distill.data.components import build_codec, build_text_encoder
from distill.models import build_teacher
from distill.stages.causal_init import build_student
from student.generator import StreamingGenerator, VideoSettings
from teacher.encoders import pixels_to_uint8
from teacher.sampler import draw_noise, sample

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["wide: a red circle moves left", "close-up: the red circle stays still",
           "medium: a blue square moves right", "wide: the circle and the square move up"]


def build(teacher_recipe: Path, student_recipe: Path, overrides: list[str]
          ) -> tuple[StreamingGenerator, torch.nn.Module, object]:
    """The generator (student) and the teacher around one random tiny Wan."""
    cfg_teacher, cfg = load_recipe(teacher_recipe, overrides), load_recipe(student_recipe, overrides)
    torch.manual_seed(cfg.run.seed)
    teacher = build_teacher(cfg_teacher).eval().requires_grad_(False)
    student = build_student(cfg, teacher).eval().requires_grad_(False)
    video = VideoSettings(cfg.data.height, cfg.data.width, cfg.data.fps, cfg.data.shot_frames)
    gen = StreamingGenerator(student, build_codec(cfg.codec), build_text_encoder(cfg.text_encoder), video,
                             global_prompt="a red circle and a blue square on grass", seed=cfg.run.seed)
    return gen, teacher, cfg_teacher


def rollout(gen: StreamingGenerator, chunks: int, shot_chunks: int, watch: dict | None = None) -> list[float]:
    """Seconds per chunk of one rollout from reset(); `watch` maps chunk index -> profiler results."""
    gen.reset()
    times, index, shot = [], 0, 0
    while index < chunks:
        stream = gen.next_shot(PROMPTS[shot % len(PROMPTS)], gen.frames_for(shot_chunks))
        shot += 1
        while True:
            profiler = _profiler() if watch is not None and index in watch else None
            start = time.perf_counter()
            if profiler is not None:
                profiler.__enter__()
            frames = next(stream, None)
            if profiler is not None:
                profiler.__exit__(None, None, None)
                watch[index] = {"peak_bytes": _peak_bytes(profiler), "persistent_bytes": persistent_bytes(gen)}
            if frames is None:
                break
            times.append(time.perf_counter() - start)
            index += 1
    return times[:chunks]


def _profiler():
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True)


def _peak_bytes(profiler) -> int:
    """Peak of live bytes created during the profiled span above its start (CREATE +, DESTROY -)."""
    from torch.profiler._memory_profiler import Action

    live = peak = 0
    for _, action, _, size in sorted(profiler._memory_profile().timeline, key=lambda e: e[0]):
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def persistent_bytes(gen: StreamingGenerator) -> int:
    """Bytes the generator keeps between chunks: the KV-cache buffer and the history tensors."""
    held = gen.stream.cache.buffer.nbytes + sum(t.nbytes for lat, text in gen.references for t in (lat, text))
    for shot in gen.shots:
        held += sum(t.nbytes for t in shot.kept.values()) + (shot.text.nbytes if shot.text is not None else 0)
        # ranked context rules (student/memory.py): the candidates' similarity features (clip: embeddings)
        held += sum(f.nbytes for f in shot.features.values() if isinstance(f, torch.Tensor))
    return held


def shot_times(gen: StreamingGenerator, teacher, cfg, steps: int, guidance: float, repeats: int) -> tuple[float, float]:
    """Median seconds for one shot after two shots of history: student vs teacher (same context)."""
    student_s, teacher_s = [], []
    for _ in range(repeats):
        gen.reset()
        for prompt in PROMPTS[:2]:
            list(gen.next_shot(prompt))
        context = gen._context(PROMPTS[2])
        start = time.perf_counter()
        text = gen._model_text(PROMPTS[2]).unsqueeze(0)
        negative = gen._model_text(cfg.sampler.negative_prompt).unsqueeze(0)
        shape = (1, gen.codec.channels, gen.video.frames // gen.codec.temporal_factor, *gen.latent_size)
        noise = draw_noise(shape, torch.Generator().manual_seed(0))
        denoiser = lambda x, t, txt: teacher(x, t, txt, **context.kwargs())  # noqa: E731
        x0 = sample(denoiser, text, noise, negative_text=negative, guidance_scale=guidance, steps=steps,
                    shift=cfg.sampler.shift).x0
        pixels_to_uint8(gen.codec.decode(x0)[0])
        teacher_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        list(gen.next_shot(PROMPTS[2]))
        student_s.append(time.perf_counter() - start)
    return statistics.median(student_s), statistics.median(teacher_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-recipe", type=Path, default=ROOT / "recipes/tiny/teacher.yaml")
    parser.add_argument("--student-recipe", type=Path, default=ROOT / "recipes/tiny/causal-init.yaml")
    parser.add_argument("--chunks", type=int, nargs=2, default=[2, 40], help="the two chunk indices compared")
    parser.add_argument("--shot-chunks", type=int, default=2, help="chunks per shot of the long rollout")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--teacher-steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=5.0, help="ordinary CFG scale of the teacher")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared CPU)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of both recipes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen, teacher, cfg = build(args.teacher_recipe, args.student_recipe, args.overrides)
    early, late = args.chunks
    runs = [rollout(gen, late + 1, args.shot_chunks) for _ in range(args.repeats)]
    median = [statistics.median(r[i] for r in runs) for i in range(late + 1)]
    best = [min(r[i] for r in runs) for i in range(late + 1)]
    watch = {early: None, late: None}
    rollout(gen, late + 1, args.shot_chunks, watch)
    student_s, teacher_s = shot_times(gen, teacher, cfg, args.teacher_steps, args.guidance, args.repeats)
    result = {
        "chunk_s_min": {early: best[early], late: best[late]}, "time_ratio_min": best[late] / best[early],
        "chunk_s_median": {early: median[early], late: median[late]},
        "time_ratio_median": median[late] / median[early],
        "peak_bytes": {i: watch[i]["peak_bytes"] for i in watch},
        "peak_ratio": watch[late]["peak_bytes"] / watch[early]["peak_bytes"],
        "persistent_bytes": {i: watch[i]["persistent_bytes"] for i in watch},
        "chunk_s_min_range": [min(best), max(best)],
        "shot_s": {"student": student_s, "teacher": teacher_s}, "speedup": teacher_s / student_s,
        "shot_frames": gen.video.frames, "rollout_shot_frames": gen.frames_for(args.shot_chunks),
        "tokens_per_frame": gen.student.frame_tokens(*gen.latent_size), "threads": args.threads,
        "repeats": args.repeats, "teacher_steps": args.teacher_steps, "guidance": args.guidance,
        "overrides": args.overrides,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
