"""Compressed local memory (FilmWeaver's FramePack-style local cache): older chunks kept smaller.

`student.local_compression` lists a spatial pooling kernel per past chunk of the shot, newest first,
one per local chunk (e.g. [1, 2, 4] with local_chunks 3: the previous chunk whole, the one before
2×2-pooled (area ×4), the one before that 4×4-pooled (×16)). The local cache then holds
sum(chunk_tokens / k²) tokens instead of local_chunks · chunk_tokens, so a longer local window fits
the same memory and per-chunk time, and both stay flat however long the shot runs.

What is pooled: each latent frame's K/V token grid (after RoPE, as the cache stores them), averaged
over k×k neighbouring tokens. Kernels must not decrease and each must divide the next, so the cache
can pool a chunk again as it ages (k_j → k_{j+1} by k_{j+1}/k_j) and the result equals pooling the
original by k_{j+1} directly: the full-sequence training forward (`compressed_attention`) and the
streaming cache (student/cache.py) see exactly the same keys, as the window does without compression.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

KEY = "student.local_compression"


def check_grid(kernels: Sequence[int], grid: tuple[int, int]) -> None:
    """Every kernel must divide the latent frame's token grid (height, width)."""
    bad = [k for k in kernels if grid[0] % k or grid[1] % k]
    if bad:
        raise ValueError(f"{KEY} kernels {bad} do not divide the {grid[0]}x{grid[1]} token grid of a latent frame")


def pooled_tokens(tokens: int, kernel: int) -> int:
    """Tokens of `tokens` (whole frames) after k×k pooling."""
    return tokens // (kernel * kernel)


def pool(x: torch.Tensor, grid: tuple[int, int], kernel: int) -> torch.Tensor:
    """x [B, n·h·w, H, D] (n whole frames of an h×w token grid, row-major) average-pooled over k×k
    tokens of each frame: [B, n·(h/k)·(w/k), H, D]. Averaged in float32, returned in x's dtype."""
    if kernel == 1:
        return x
    h, w = grid
    batch, tokens, heads, dim = x.shape
    frames = tokens // (h * w)
    planes = x.float().view(batch, frames, h, w, heads * dim).permute(0, 1, 4, 2, 3).flatten(0, 1)
    pooled = F.avg_pool2d(planes, kernel)
    pooled = pooled.view(batch, frames, heads * dim, h // kernel, w // kernel).permute(0, 1, 3, 4, 2)
    return pooled.reshape(batch, -1, heads, dim).to(x.dtype)


def age(history: list[torch.Tensor], newest: torch.Tensor, kernels: Sequence[int],
        grid: tuple[int, int]) -> list[torch.Tensor]:
    """The local history after a chunk commits, newest first: `newest` (whole) pooled by kernels[0],
    each older entry pooled on to its next age's kernel, the oldest beyond the window dropped."""
    aged = [pool(newest, grid, kernels[0])]
    for j, old in enumerate(history[:len(kernels) - 1]):
        aged.append(pool(old, (grid[0] // kernels[j], grid[1] // kernels[j]), kernels[j + 1] // kernels[j]))
    return aged


def compressed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, prefix_len: int, chunk_len: int,
                         grid: tuple[int, int], kernels: Sequence[int]) -> torch.Tensor:
    """Chunk-causal attention on [B, L, H, D] whose past chunks are seen pooled (module doc): the
    prefix (context) attends to itself; chunk i to the prefix, chunk i - 1 - j pooled by kernels[j]
    (j < len(kernels)) and itself. The full-sequence equivalent of the compressed local cache."""
    def sdpa(query, keys, values):
        return F.scaled_dot_product_attention(query.transpose(1, 2), keys.transpose(1, 2),
                                              values.transpose(1, 2)).transpose(1, 2)

    total = q.shape[1]
    if (total - prefix_len) % chunk_len:
        raise ValueError(f"compressed attention: {total - prefix_len} target tokens are not whole chunks "
                         f"of {chunk_len}")
    outs = [sdpa(q[:, :prefix_len], k[:, :prefix_len], v[:, :prefix_len])] if prefix_len else []
    span = lambda x, i: x[:, prefix_len + i * chunk_len:prefix_len + (i + 1) * chunk_len]  # noqa: E731
    for i in range((total - prefix_len) // chunk_len):
        past = [(j, i - 1 - j) for j in range(min(i, len(kernels)))]
        keys = [k[:, :prefix_len]] + [pool(span(k, c), grid, kernels[j]) for j, c in past] + [span(k, i)]
        values = [v[:, :prefix_len]] + [pool(span(v, c), grid, kernels[j]) for j, c in past] + [span(v, i)]
        outs.append(sdpa(span(q, i), torch.cat(keys, dim=1), torch.cat(values, dim=1)))
    return torch.cat(outs, dim=1)
