"""Wan's 3D rotary embedding evaluated at temporal positions we choose (shot RoPE).

Wan splits each head's dims into temporal / height / width parts and rotates each part by the
token's integer coordinate. We keep the height/width parts exactly as diffusers tabulates them and
recompute the temporal part from float positions, in float64 like diffusers, so integer positions
reproduce diffusers bit for bit while `t + k·θ` shot offsets stay possible.
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


def shot_positions(frame_shots: torch.Tensor, theta: float) -> torch.Tensor:
    """Temporal positions `t + k·θ` for frames whose shot indices are `frame_shots` [..., F].

    `t` is the frame's index in the sequence; `k` its shot index. θ = 0 gives plain sequential
    positions (the "sequential" ablation).
    """
    frames = torch.arange(frame_shots.shape[-1], dtype=torch.float64, device=frame_shots.device)
    return frames + frame_shots.to(torch.float64) * theta


def wan_rotary(
    rope: WanRotaryPosEmbed, positions: torch.Tensor, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [P, F·height·width, 1, head_dim] for token grids at temporal `positions`.

    positions: [F] or [P, F] floats (one row per batch element, or one row shared by all).
    height/width: the token grid after patching. Tokens are frame-major, as Wan flattens them.
    """
    pos = positions.to(torch.float64)
    if pos.ndim == 1:
        pos = pos.unsqueeze(0)
    if height > rope.max_seq_len or width > rope.max_seq_len:
        raise ValueError(
            f"token grid {height}x{width} exceeds the model's rope_max_seq_len {rope.max_seq_len}"
        )
    rows, frames = pos.shape
    cos_t, sin_t = get_1d_rotary_pos_embed(
        rope.t_dim, pos.flatten(), rope_theta(rope), use_real=True,
        repeat_interleave_real=True, freqs_dtype=torch.float64,
    )
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
