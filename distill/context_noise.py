"""Asymmetric context noise (FilmWeaver §4.2.5): history frames are noised during training, against copy-paste.

A model trained on clean history learns to copy it; noise on the history makes it a reference, not a
source of pixels. With `data.context.noise.shot = [lo, hi]` every context frame (the shot memory:
frames picked from earlier shots) of a training sample draws its own timestep t ~ U[lo, hi] and is
noised as x_t = add_noise(x, ε, t); the frame then runs at that t (per-token timesteps, as the
target's), so the model knows how much to trust it. FilmWeaver's shot-cache range is 100-400.

FilmWeaver's second, milder range is for its temporal cache, the newest frames of the shot being
generated. The paths noised here (teacher training, the DMD critic's flow-matching loss) have no such
memory: the teacher and the critic are bidirectional over the whole target shot, which is noised at
the training timestep anyway, so only the shot-memory range maps onto them.

Generation (streaming generator, samplers, ODE pairs, the DMD real score) keeps clean context at
t = 0: the noise is a training-time regulariser and the model is asked to use a clean history at
t = 0 as the least noisy end of the range it saw. [0, 0] turns it off without a single random draw,
so a run without it keeps today's random stream.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from student.context import Context
from teacher.flow import NUM_TRAIN_TIMESTEPS, add_noise


def check_range(value: Sequence[float], name: str) -> tuple[float, float]:
    """(lo, hi) of a noise-range key, or ValueError naming the key."""
    values = list(value)
    if len(values) != 2 or not 0 <= values[0] <= values[1] <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"{name} must be [lo, hi] with 0 <= lo <= hi <= 1000, got {values}")
    return float(values[0]), float(values[1])


def noise_context(context: Context | None, span: Sequence[float]) -> Context | None:
    """`context` with every frame noised at its own t ~ U[lo, hi], those t in `Context.timesteps`
    [B, Fc]; unchanged (and nothing drawn) when there is no context or hi == 0."""
    lo, hi = check_range(span, "data.context.noise.shot")
    if context is None or hi == 0:
        return context
    latents = context.latents
    t = lo + (hi - lo) * torch.rand(latents.shape[0], latents.shape[2], dtype=torch.float64)
    t = t.to(latents.device, torch.float32)
    noise = torch.randn(latents.shape, dtype=latents.dtype).to(latents.device)
    return dataclasses.replace(context, latents=add_noise(latents, noise, t), timesteps=t)
