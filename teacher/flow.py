"""Rectified-flow math in Wan2.1's convention (notes/algorithms.md).

x_t = (1 - σ)·x0 + σ·ε with σ = t / 1000, t ∈ [0, 1000]; the network predicts v = ε - x0, so
x0 = x_t - σ·v and ε = x_t + (1 - σ)·v. Timesteps broadcast against latents [B, C, F, H, W]:
a [B] timestep is one per sample, a [B, F] timestep one per latent frame (chunked students).
"""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000.0


def sigma(t: torch.Tensor) -> torch.Tensor:
    """Noise level σ = t / 1000."""
    return t / NUM_TRAIN_TIMESTEPS


def shift_sigma(sig: torch.Tensor, shift: float) -> torch.Tensor:
    """Timestep shift σ' = s·σ / (1 + (s - 1)·σ); s > 1 spends more steps at high noise."""
    return shift * sig / (1 + (shift - 1) * sig)


def shift_timestep(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The shift applied to timesteps in [0, 1000]."""
    return shift_sigma(sigma(t), shift) * NUM_TRAIN_TIMESTEPS


def _expand(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """σ(t) shaped to broadcast over x [B, C, F, H, W]: t is [B] (per sample) or [B, F] (per frame)."""
    s = sigma(t.to(torch.promote_types(t.dtype, torch.float32)))
    if s.ndim == 1:
        return s.view(-1, 1, 1, 1, 1).to(x.dtype)
    if s.ndim == 2:
        return s.view(s.shape[0], 1, s.shape[1], 1, 1).to(x.dtype)
    raise ValueError(f"timesteps must be [B] or [B, F]; got {list(t.shape)} for latents {list(x.shape)}")


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - σ)·x0 + σ·ε."""
    s = _expand(t, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The training target v = ε - x0."""
    return noise - x0


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 = x_t - σ·v."""
    return x_t - _expand(t, x_t) * v


def noise_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ε = x_t + (1 - σ)·v."""
    return x_t + (1 - _expand(t, x_t)) * v


def velocity_from_x0(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v = (x_t - x0) / σ; undefined at σ = 0, so t must be > 0."""
    s = _expand(t, x_t)
    if bool((s <= 0).any()):
        raise ValueError("velocity_from_x0 needs t > 0 (at t = 0 the velocity is not determined by x0)")
    return (x_t - x0) / s


def classifier_free_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Ordinary CFG `uncond + scale·(cond - uncond)`: scale 1 is the conditional prediction alone."""
    return uncond + scale * (cond - uncond)


def dmd2_guidance(cond: torch.Tensor, uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """DMD2 convention `cond + g·(cond - uncond)`: g = 0 is conditional only; g equals ordinary scale g + 1."""
    return cond + guidance * (cond - uncond)


def sampling_timesteps(steps: int, shift: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """steps + 1 timesteps from 1000 down to 0, uniform in σ and then shifted (float64)."""
    if steps < 1:
        raise ValueError(f"sampling needs at least 1 step; got steps={steps}")
    sig = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64, device=device)
    return shift_sigma(sig, shift) * NUM_TRAIN_TIMESTEPS
