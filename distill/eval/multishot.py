"""Multi-shot rollouts scored for identity colour consistency (distill/eval/metrics.py): student vs teacher.

A prompt (a prepared record with facts) is generated shot by shot, every shot after the first
conditioned only on the model's own earlier shots (context frames by the student's rule, through
`context_fn`). The student rolls out through its caches (4 steps per chunk, as at inference); the
teacher samples each whole shot with the recipe's sampler. Each decoded shot is scored against the
facts of that shot; `colour_all` averages every shot, `colour_later` only shots 2.. (the ones that
depend on generated history). Noise is seeded per prompt, so before/after numbers compare the same
draws. Ranks split the prompts and sum their scores.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch
from omegaconf import DictConfig

from distill.data.components import negative_text
from distill.data.datasets import PromptDataset
from distill.eval.metrics import colour_consistency
from distill.rollout import ContextFn, SelfForcingGenerator
from teacher.encoders import Codec, pixels_to_uint8
from teacher.sampler import draw_noise, sample
from student.context import kwargs_of

# (texts: list of [1, L, D], generator) -> clean latents of every shot, each [1, C, F, h, w]
Rollout = Callable[[list, torch.Generator], list]


def student_rollout(student, chunks: int, height: int, width: int, context_fn: ContextFn) -> Rollout:
    generator = SelfForcingGenerator(student)
    return lambda texts, gen: [s["x"] for s in generator(texts, chunks, None, height, width,
                                                         context_fn=context_fn, generator=gen)]


def guided_negative(cfg: DictConfig, device, dtype) -> torch.Tensor | None:
    """[1, L, D] unconditional text of the teacher's sampler, or None when `sampler.guidance_scale` is 1."""
    return None if cfg.sampler.guidance_scale == 1.0 else negative_text(cfg, device, dtype)


def teacher_shots(teacher, shape: tuple, sampler: DictConfig, negative: torch.Tensor | None,
                  context_fn: ContextFn, texts: Iterable[torch.Tensor], gen: torch.Generator) -> Iterator[torch.Tensor]:
    """The teacher's shots, each clean latents [1, C, F, h, w] yielded as soon as it is sampled; shot k
    is conditioned on `context_fn` of the shots before it. `texts` ([1, L, D] each) may be lazy, so a
    caller can time each shot from its caption's encoding; shape = (C, F, h, w) of one shot."""
    shots: list[torch.Tensor] = []
    seen: list[torch.Tensor] = []
    for text in texts:
        context = context_fn(shots, seen)
        extra = kwargs_of(context and context.to(dtype=text.dtype))
        noise = draw_noise((1, *shape), gen, text.dtype, text.device)
        denoise = lambda x, t, txt: teacher(x, t, txt, **extra)  # noqa: E731
        shot = sample(denoise, text, noise, negative_text=negative, guidance_scale=sampler.guidance_scale,
                      steps=sampler.steps, shift=sampler.shift).x0.float()
        shots.append(shot)
        seen.append(text)
        yield shot


def teacher_rollout(teacher, shape: tuple, sampler: DictConfig, negative: torch.Tensor | None,
                    context_fn: ContextFn) -> Rollout:
    """The teacher's multi-shot rollout (`teacher_shots` to the end); shape = (C, F, h, w) of one shot."""
    return lambda texts, gen: list(teacher_shots(teacher, shape, sampler, negative, context_fn, texts, gen))


@torch.no_grad()
def multishot_colour(rollout: Rollout, prompts: PromptDataset, count: int, codec: Codec, seed: int, env,
                     dtype: torch.dtype) -> dict[str, float]:
    """{colour_all, colour_later} over the first `count` prompts (every rank runs its share)."""
    from distill.distributed import all_sum

    totals = torch.zeros(4, dtype=torch.float64)
    total = min(count, len(prompts))
    # every rank runs the same number of rollouts (a ZeRO-3 teacher gathers weights collectively);
    # the padding repeats a prompt with weight 0
    for j in range(-(-total // env.world_size)):
        i = env.rank + j * env.world_size
        weight = float(i < total)
        item = prompts[i % total]
        texts = [t[None].to(env.device, dtype) for t in item["texts"]]
        shots = rollout(texts, torch.Generator().manual_seed(seed * 1_000_003 + i))
        for k, latents in enumerate(shots):
            frames = pixels_to_uint8(codec.decode(latents.float())[0].cpu())
            score = colour_consistency(frames, item["facts"], k)
            totals += weight * torch.tensor([score, 1.0, score if k else 0.0, float(k > 0)], dtype=torch.float64)
    totals = all_sum(totals.to(env.device)).cpu()
    return {"colour_all": float(totals[0] / totals[1].clamp(min=1)),
            "colour_later": float(totals[2] / totals[3].clamp(min=1))}
