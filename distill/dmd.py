"""DMD losses in the DMD2 form (Self Forcing / ShotStream §8): pure functions of tensors and callables.

Conventions (notes/algorithms.md): x_t = (1 - σ)·x + σ·ε with σ = t / 1000; every score network
predicts the velocity v = ε - x, so x0 = x_t - σ·v. A score is passed as a callable
`(x_t [B, C, F, H, W], t [B]) -> v`, with its conditioning (text, context) bound by the caller.

Generator loss of a generated sample x (the student's rollout, with gradient):
  t ~ U[0, 1000], shifted by `shift`, clamped to [min_t, max_t]; x_t from fresh noise ε;
  x0_real from the real score with guidance in the DMD2 convention `cond + g·(cond - uncond)` (on
  velocities; x0 is linear in v, so it is the same on x0), i.e. g = 0 is the conditional score alone
  and g = 3 equals ordinary CFG with scale 4; x0_fake from the critic, conditional only;
  grad = (x0_fake - x0_real) / mean|x - x0_real| per sample (then nan_to_num);
  loss = 0.5·mse(x, (x - grad).detach()) in float64, whose gradient w.r.t. x is grad / numel.
Critic loss: flow matching `mean((v_fake(x_t) - (ε - x))²)` on the detached generator sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from teacher.flow import NUM_TRAIN_TIMESTEPS, add_noise, dmd2_guidance, shift_timestep, velocity_target, \
    x0_from_velocity

# (x_t [B, C, F, H, W], t [B]) -> velocity, conditioning bound by the caller
Score = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class GeneratorLoss:
    """The float64 surrogate loss and what is logged about the DMD gradient."""

    loss: torch.Tensor
    grad_norm: torch.Tensor  # mean over samples of the per-sample L2 norm of `grad` (detached)


def draw_timesteps(batch: int, shift: float, min_t: float, max_t: float,
                   generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """DMD timesteps [B] (float32): uniform in [0, 1000], shifted, clamped to [min_t, max_t]."""
    if not 0 <= min_t <= max_t <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"DMD timesteps need 0 <= min_t <= max_t <= 1000; got [{min_t}, {max_t}]")
    u = torch.rand(batch, generator=generator, dtype=torch.float64) * NUM_TRAIN_TIMESTEPS
    return shift_timestep(u, shift).clamp(min_t, max_t).to(device=device, dtype=torch.float32)


def guided_x0(x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
              guidance: float) -> torch.Tensor:
    """x0 of the real score from its conditional/unconditional velocities (DMD2 guidance g)."""
    v = cond if uncond is None or guidance == 0 else dmd2_guidance(cond, uncond, guidance)
    return x0_from_velocity(x_t, v, t)


def dmd_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """(x0_fake - x0_real) / mean|x - x0_real| per sample, non-finite values zeroed (DMD2)."""
    x, x0_real, x0_fake = x.detach().double(), x0_real.double(), x0_fake.double()
    scale = (x - x0_real).abs().flatten(1).mean(1).view(-1, *([1] * (x.ndim - 1)))
    # nan_to_num's default maps ±inf (c / 0) to ±1.8e308, which squares to inf in the surrogate: a
    # sample whose x equals the real x0 exactly has no usable direction, so it contributes zero.
    return torch.nan_to_num((x0_fake - x0_real) / scale, nan=0.0, posinf=0.0, neginf=0.0)


def dmd_surrogate(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5·mse(x, (x - grad).detach()) in float64: backward puts grad / numel on x."""
    x64 = x.double()
    return 0.5 * F.mse_loss(x64, (x64 - grad.double()).detach())


def generator_loss(x: torch.Tensor, real: Score, fake: Score, t: torch.Tensor, noise: torch.Tensor,
                   real_uncond: Score | None = None, guidance: float = 0.0) -> GeneratorLoss:
    """The generator's DMD loss on samples x [B, C, F, H, W] at timesteps t [B] with noise ε.

    `guidance` is the DMD2 g (real x0 from `cond + g·(cond - uncond)`; g = 3 is ordinary CFG 4); with
    g != 0 `real_uncond` (the real score under the negative prompt) is required. The scores run
    without gradient: only x carries the graph back to the generator.
    """
    if guidance != 0 and real_uncond is None:
        raise ValueError(f"DMD guidance {guidance} needs the unconditional real score (real_uncond)")
    with torch.no_grad():
        x_t = add_noise(x.detach().float(), noise.float(), t)
        cond = real(x_t, t).float()
        uncond = real_uncond(x_t, t).float() if guidance != 0 else None
        x0_real = guided_x0(x_t, t, cond, uncond, guidance)
        x0_fake = x0_from_velocity(x_t, fake(x_t, t).float(), t)
        grad = dmd_gradient(x, x0_real, x0_fake)
    norm = grad.flatten(1).norm(dim=1).mean()
    return GeneratorLoss(dmd_surrogate(x, grad), norm.float())


def critic_loss(fake: Score, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Flow-matching loss of the critic on detached generator samples x at timesteps t [B]."""
    x = x.detach().float()
    x_t = add_noise(x, noise.float(), t)
    return (fake(x_t, t).float() - velocity_target(x, noise.float())).pow(2).mean()
