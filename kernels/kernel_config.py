"""Tile shapes and launch settings of the chunk-attention kernels, picked per head dim, dtype and device.

A fixed table instead of `@triton.autotune`: autotuning with several configs fails under the
interpreter, and a table keeps runs reproducible. Under the interpreter the tiles are the
smallest `tl.dot` accepts, so that small test sequences still span many tiles and boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TileConfig:
    """Query-tile rows, key-tile rows, warps and software-pipelining stages of one kernel."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def tile_configs(head_dim: int, dtype: torch.dtype, on_cuda: bool) -> dict[str, TileConfig]:
    """Configs of the "forward", "dkdv" and "dq" kernels.

    The dK/dV kernel keeps a key tile resident and streams query tiles, so its key tile is the
    large one; the dQ kernel is the mirror image. fp32 tiles are halved to fit shared memory.
    """
    if not on_cuda:
        tile = TileConfig(16, 16, 1, 1)
        return {"forward": tile, "dkdv": tile, "dq": tile}
    scale = 2 if dtype == torch.float32 else 1
    warps = 8 if head_dim > 64 else 4
    return {
        "forward": TileConfig(128 // scale, 64 // scale, warps, 3 if scale == 1 else 2),
        "dkdv": TileConfig(32, 128 // scale, warps, 3 if scale == 1 else 2),
        "dq": TileConfig(128 // scale, 32, warps, 3 if scale == 1 else 2),
    }
