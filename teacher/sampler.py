"""Flow-matching Euler sampler with classifier-free guidance (teacher sampling and ODE pairs).

Guidance is ordinary CFG, `uncond + scale·(cond - uncond)` against a negative-prompt embedding
(scale 1, or no negative text, samples the conditional model alone). The state is integrated in
float32 whatever the model dtype. Given the same initial noise the result is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from teacher.flow import classifier_free_guidance, sampling_timesteps, sigma

# (x_t [B, C, F, H, W], t [B], text [B, L, D]) -> velocity; bind context with a closure.
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SampleResult:
    """Clean sample, the latents at the requested timesteps [K, B, C, F, H, W], and the schedule."""

    x0: torch.Tensor
    trajectory: torch.Tensor
    keep_timesteps: torch.Tensor
    timesteps: torch.Tensor


def draw_noise(shape: Sequence[int], generator: torch.Generator, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> torch.Tensor:
    """Initial noise from `generator` (drawn on the generator's device, then moved)."""
    noise = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32)
    return noise.to(device=device or generator.device, dtype=dtype)


def schedule(steps: int, shift: float, keep: Sequence[float] = ()) -> torch.Tensor:
    """Descending timesteps 1000 → 0: the shifted grid with the `keep` timesteps inserted as nodes,
    so that the trajectory passes exactly through them (Euler over a slightly finer grid)."""
    grid = sampling_timesteps(steps, shift)
    extra = torch.tensor([float(t) for t in keep], dtype=torch.float64)
    if bool(((extra < 0) | (extra > 1000)).any()):
        raise ValueError(f"keep timesteps must lie in [0, 1000]; got {extra.tolist()}")
    merged = torch.cat([grid, extra]).sort(descending=True).values
    distinct = torch.ones_like(merged, dtype=torch.bool)
    distinct[1:] = (merged[:-1] - merged[1:]) > 1e-6
    return merged[distinct]


@torch.no_grad()
def sample(denoiser: Denoiser, text: torch.Tensor, noise: torch.Tensor, *,
           guidance_scale: float, steps: int, shift: float, negative_text: torch.Tensor | None = None,
           negative_denoiser: Denoiser | None = None, keep_timesteps: Sequence[float] = ()) -> SampleResult:
    """Integrate dx/dσ = v from σ = 1 (x = noise) to σ = 0 with Euler steps and CFG; the negative
    branch runs `negative_denoiser` (default: `denoiser`) on `negative_text`. The settings have no
    defaults here: they come from a recipe (`sampler.*`, `ode.*`), where the defaults live."""
    times = schedule(steps, shift, keep_timesteps)
    keep = torch.tensor([float(t) for t in keep_timesteps], dtype=torch.float64)
    guided = negative_text is not None and guidance_scale != 1.0
    x = noise.float()
    kept: dict[int, torch.Tensor] = {}
    for i in range(len(times) - 1):
        t_now, t_next = times[i], times[i + 1]
        _remember(kept, keep, t_now, x, noise.dtype)
        t = torch.full((noise.shape[0],), float(t_now), device=noise.device, dtype=torch.float32)
        v = denoiser(x.to(noise.dtype), t, text).float()
        if guided:
            uncond = (negative_denoiser or denoiser)(x.to(noise.dtype), t, negative_text).float()
            v = classifier_free_guidance(v, uncond, guidance_scale)
        x = x + float(sigma(t_next) - sigma(t_now)) * v
    _remember(kept, keep, times[-1], x, noise.dtype)
    trajectory = torch.stack([kept[i] for i in range(len(keep))]) if len(keep) else x.new_empty(0)
    return SampleResult(x.to(noise.dtype), trajectory, keep, times)


def _remember(kept: dict[int, torch.Tensor], keep: torch.Tensor, t: torch.Tensor, x: torch.Tensor,
              dtype: torch.dtype) -> None:
    """Store x for every requested timestep equal to t (within the schedule's merge tolerance)."""
    for i in torch.nonzero((keep - t).abs() <= 1e-6).flatten().tolist():
        kept[i] = x.to(dtype)
