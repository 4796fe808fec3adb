"""Shared builders for tests: a tiny random Wan transformer (2 layers, 2 heads) that builds in well under a second."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_wan_config(**overrides) -> dict:
    """Config of a 2-layer, 2-head WanTransformer3DModel with tiny dims (head dim 16 splits 8/4/4 for RoPE)."""
    config = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        text_dim=24,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=64,
    )
    config.update(overrides)
    return config


def make_tiny_wan(folder: str | Path | None = None, seed: int = 0, **overrides):
    """Build a tiny random WanTransformer3DModel (saved as a diffusers folder when `folder` is given)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**tiny_wan_config(**overrides))
    # Random, not default, values everywhere so that no parity test passes by symmetry.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.eval()
    if folder is not None:
        model.save_pretrained(str(folder))
    return model
