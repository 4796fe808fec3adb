"""Wan's 3D rotary embedding with a shot phase on the temporal bands (shot RoPE, ShotStream §4.2).

Wan splits each head's dims into temporal / height / width parts and rotates each part by the
token's integer coordinate. We keep the height/width parts exactly as diffusers tabulates them and
recompute the temporal part, in float64 like diffusers, so that frames of shot k at index t turn
every temporal band j by the angle `ω_j·t + k·θ`: a PHASE k·θ added to each band's angle, the
same in every band (the official release adds `shot_flags·θ` to the raw angles). It is not a
position shift `(t + k·θ)·ω_j`, which with Wan's 22 temporal bands moves band 0 by 0.167 rad and
most bands by under 0.01 rad. Phase 0 reproduces diffusers bit for bit.
"""

from __future__ import annotations

import inspect

import torch
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed


def rope_theta(rope: WanRotaryPosEmbed) -> float:
    """The rotary base of a Wan rope module (diffusers does not store it; it uses its default)."""
    default = inspect.signature(WanRotaryPosEmbed.__init__).parameters["theta"].default
    return float(getattr(rope, "theta", default))


def shot_positions(frame_shots: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [F], phases [..., F]) of frames whose shot indices are `frame_shots` [..., F]:
    each frame's index t in the sequence, and its shot phase k·θ radians. θ = 0 gives plain
    sequential positions (the "sequential" ablation)."""
    frames = torch.arange(frame_shots.shape[-1], dtype=torch.float64, device=frame_shots.device)
    return frames, frame_shots.to(torch.float64) * theta


def wan_rotary(
    rope: WanRotaryPosEmbed, positions: torch.Tensor, height: int, width: int,
    phases: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [P, F·height·width, 1, head_dim] for token grids at temporal `positions`.

    positions: [F] or [P, F] frame indices (one row per batch element, or one row shared by all);
    phases: the same shapes, radians added to the angle of every temporal band (module doc).
    height/width: the token grid after patching. Tokens are frame-major, as Wan flattens them.
    """
    pos = positions.to(torch.float64)
    pos = pos.unsqueeze(0) if pos.ndim == 1 else pos
    if height > rope.max_seq_len or width > rope.max_seq_len:
        raise ValueError(
            f"token grid {height}x{width} exceeds the model's rope_max_seq_len {rope.max_seq_len}"
        )
    if phases is not None:
        phase = phases.to(device=pos.device, dtype=torch.float64)
        phase = phase.unsqueeze(0) if phase.ndim == 1 else phase
        pos, phase = torch.broadcast_tensors(pos, phase)
    rows, frames = pos.shape
    cos_t, sin_t = get_1d_rotary_pos_embed(
        rope.t_dim, pos.flatten(), rope_theta(rope), use_real=True,
        repeat_interleave_real=True, freqs_dtype=torch.float64,
    )
    if phases is not None:  # cos(a + φ), sin(a + φ): exact at φ = 0
        c, s = torch.cos(phase).reshape(-1, 1), torch.sin(phase).reshape(-1, 1)
        cos_t, sin_t = cos_t * c - sin_t * s, sin_t * c + cos_t * s
    tables = []
    for t_part, table in ((cos_t, rope.freqs_cos), (sin_t, rope.freqs_sin)):
        _, h_tab, w_tab = table.split([rope.t_dim, rope.h_dim, rope.w_dim], dim=1)
        t_part = t_part.to(table.device).view(rows, frames, 1, 1, -1)
        h_part = h_tab[:height].view(1, 1, height, 1, -1)
        w_part = w_tab[:width].view(1, 1, 1, width, -1)
        grid = (rows, frames, height, width)
        full = torch.cat(
            [t_part.expand(*grid, -1), h_part.expand(*grid, -1), w_part.expand(*grid, -1)], dim=-1
        )
        tables.append(full.reshape(rows, frames * height * width, 1, -1))
    return tables[0], tables[1]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, L, H, D] exactly as diffusers' Wan processor does."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)
