"""Multi-shot rollouts of the student and the teacher, each shot after the first on the model's own history.

A prompt's shots are generated one after another, every shot after the first conditioned only on
the model's own earlier shots (context frames by the student's rule, through `context_fn`). The
student rolls out through its caches (`student_rollout`: its denoising steps per chunk, as at
inference); the teacher samples each whole shot with the recipe's sampler (`teacher_shots`, lazily
shot by shot, which the teacher's video maker times; `teacher_rollout`, all shots at once). The DMD
probe (distill/eval/probes.py `multishot_colour`) scores these rollouts, the teacher's video maker
(distill/eval/makers.py) decodes them into videos.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

import torch
from omegaconf import DictConfig

from distill.data.components import negative_text
from distill.rollout import ContextFn, SelfForcingGenerator
from student.context import denoisers
from teacher.sampler import draw_noise, sample

# (texts: list of [1, L, D], generator) -> clean latents of every shot, each [1, C, F, h, w]
Rollout = Callable[[list, torch.Generator], list]


def student_rollout(student, chunks: int, height: int, width: int, context_fn: ContextFn) -> Rollout:
    generator = SelfForcingGenerator(student)
    return lambda texts, gen, captions=None: [s["x"] for s in generator(texts, chunks, None, height, width,
                                                                        context_fn=context_fn, generator=gen,
                                                                        captions=captions)]


def guided_negative(cfg: DictConfig, device, dtype) -> torch.Tensor | None:
    """[1, L, D] unconditional text of the teacher's sampler, or None when `sampler.guidance_scale` is 1."""
    return None if cfg.sampler.guidance_scale == 1.0 else negative_text(cfg, device, dtype)


def teacher_shots(teacher, shape: tuple, sampler: DictConfig, negative: torch.Tensor | None,
                  context_fn: ContextFn, texts: Iterable[torch.Tensor], gen: torch.Generator,
                  captions: Sequence[Sequence[str]] | None = None) -> Iterator[torch.Tensor]:
    """The teacher's shots, each clean latents [1, C, F, h, w] yielded as soon as it is sampled; shot k
    is conditioned on `context_fn` of the shots before it. `texts` ([1, L, D] each) may be lazy, so a
    caller can time each shot from its caption's encoding; shape = (C, F, h, w) of one shot."""
    shots: list[torch.Tensor] = []
    seen: list[torch.Tensor] = []
    for text in texts:
        context = context_fn(shots, seen, captions=captions)
        cond, uncond = denoisers(teacher, context and context.to(dtype=text.dtype), sampler.negative_scope)
        noise = draw_noise((1, *shape), gen, text.dtype, text.device)
        shot = sample(cond, text, noise, negative_text=negative, negative_denoiser=uncond,
                      guidance_scale=sampler.guidance_scale, steps=sampler.steps, shift=sampler.shift).x0.float()
        shots.append(shot)
        seen.append(text)
        yield shot


def teacher_rollout(teacher, shape: tuple, sampler: DictConfig, negative: torch.Tensor | None,
                    context_fn: ContextFn) -> Rollout:
    """The teacher's multi-shot rollout (`teacher_shots` to the end); shape = (C, F, h, w) of one shot."""
    return lambda texts, gen, captions=None: list(teacher_shots(teacher, shape, sampler, negative, context_fn, texts,
                                                                gen, captions))
