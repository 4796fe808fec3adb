"""Protects the Wan backbone adapter: diffusers parity, float RoPE positions, KV hooks, per-frame text, checkpointing, shape errors."""

import pytest
import torch
from helpers import make_tiny_wan

from kernels import chunk_causal_attention
from teacher.backbone import TokenGrid, WanBackbone, sdpa_attention
from teacher.rope import shot_positions, wan_rotary


@pytest.fixture(scope="module")
def wan():
    return make_tiny_wan()


@pytest.mark.parametrize("frames,height,width", [(1, 4, 4), (3, 8, 6), (5, 6, 10)])
def test_matches_diffusers_forward(wan, frames, height, width):
    backbone = WanBackbone(wan)
    x = torch.randn(2, 4, frames, height, width)
    t = torch.tensor([10.0, 700.0])
    text = torch.randn(2, 7, wan.config.text_dim)
    with torch.no_grad():
        ref = wan(x, t, text, return_dict=False)[0]
        ours = backbone(x, t, torch.arange(frames), backbone.text_kv(text))
        per_frame = backbone(x, t[:, None].expand(2, frames), torch.arange(frames).double(),
                             backbone.text_kv(text))
    assert (ref - ours).abs().max().item() <= 1e-5
    assert (ref - per_frame).abs().max().item() <= 1e-5


def test_integer_positions_reproduce_diffusers_rope_and_phases_move_only_time(wan):
    cos_ref, sin_ref = wan.rope(torch.zeros(1, 4, 3, 6, 8))
    cos, sin = wan_rotary(wan.rope, torch.arange(3).double(), 3, 4)
    assert torch.equal(cos, cos_ref) and torch.equal(sin, sin_ref)
    positions, phases = shot_positions(torch.zeros(3, dtype=torch.long), 1 / 6)
    zero, zero_sin = wan_rotary(wan.rope, positions, 3, 4, phases)
    assert torch.equal(zero, cos_ref) and torch.equal(zero_sin, sin_ref)  # shot 0: exactly diffusers
    positions, phases = shot_positions(torch.tensor([0, 0, 1]), 1 / 6)
    shifted, _ = wan_rotary(wan.rope, positions, 3, 4, phases)
    t_dim = wan.rope.t_dim
    assert torch.equal(shifted[..., t_dim:], cos_ref[..., t_dim:])  # height and width bands untouched
    per_token = shifted.view(3, 12, -1)
    assert torch.equal(per_token[:2], cos_ref.view(3, 12, -1)[:2])


@pytest.mark.parametrize("t,k,theta", [(0, 0, 1 / 6), (5, 1, 1 / 6), (7, 3, 0.4), (40, 9, 1 / 6)])
def test_shot_rope_is_a_phase_in_every_temporal_band(wan, t, k, theta):
    """Angle of band j for frame t of shot k is ω_j·t + k·θ (ω_j = base^(-2j/t_dim)): shots k and k + 1
    at equal t differ by exactly θ in every band, the slow ones included (a position shift would turn
    band j by θ·ω_j only)."""
    import math

    t_dim = wan.rope.t_dim
    cos, sin = wan_rotary(wan.rope, torch.tensor([t, t], dtype=torch.float64), 1, 1,
                          phases=torch.tensor([k * theta, (k + 1) * theta], dtype=torch.float64))
    angle = torch.atan2(sin[0, :, 0, :t_dim:2], cos[0, :, 0, :t_dim:2]).double()  # [2 frames, bands]
    omega = torch.tensor([10000.0 ** (-2 * j / t_dim) for j in range(t_dim // 2)], dtype=torch.float64)
    wrap = lambda a: torch.remainder(a + math.pi, 2 * math.pi) - math.pi  # noqa: E731
    assert torch.allclose(wrap(angle[0] - (omega * t + k * theta)), torch.zeros_like(omega), atol=1e-5)
    assert torch.allclose(wrap(angle[1] - angle[0]), torch.full_like(omega, theta), atol=1e-5)


class AppendingCache:
    """A minimal KV provider: keeps every processed token's keys/values and attends to all of them."""

    def __init__(self):
        self.stored = {}

    def extend(self, layer, k, v):
        if layer in self.stored:
            k, v = (torch.cat([old, new], dim=1) for old, new in zip(self.stored[layer], (k, v)))
        self.stored[layer] = (k, v)
        return k, v


def test_kv_provider_reproduces_chunk_causal_attention(wan):
    """Context frames, then one-frame chunks through the cache, equal one chunk-causal full pass."""
    backbone = WanBackbone(wan)
    x = torch.randn(1, 4, 4, 4, 6)
    t = torch.tensor([[0.0, 0.0, 500.0, 250.0]])
    positions = torch.tensor([0.0, 1.0, 2 + 1 / 6, 3 + 1 / 6], dtype=torch.float64)
    text = backbone.text_kv(torch.randn(1, 5, wan.config.text_dim))
    per_frame = 6  # 4x6 latents, 2x2 patches
    prefix = 2 * per_frame

    def causal(q, k, v):
        return chunk_causal_attention(q, k, v, prefix_len=prefix, chunk_len=per_frame)

    cache = AppendingCache()
    with torch.no_grad():
        full = backbone(x, t, positions, text, attn=causal)
        backbone(x[:, :, :2], t[:, :2], positions[:2], text, attn=causal, kv=cache)
        # the newest frame's queries see every cached key: plain attention over the cache
        steps = [backbone(x[:, :, f:f + 1], t[:, f:f + 1], positions[f:f + 1], text,
                          attn=sdpa_attention, kv=cache) for f in (2, 3)]
    heads, dim = wan.config.num_attention_heads, wan.config.attention_head_dim
    assert cache.stored[0][0].shape == (1, 4 * per_frame, heads, dim)
    assert (full[:, :, 2:] - torch.cat(steps, dim=2)).abs().max().item() <= 1e-5
    assert (full[:, :, :2] - backbone(x[:, :, :2], t[:, :2], positions[:2], text)).abs().max().item() <= 1e-5


def test_per_frame_text_groups_match_separate_passes(wan):
    """Frames indexed to text group g attend exactly to text g (one batched call for all frames)."""
    backbone = WanBackbone(wan)
    blocks = wan.blocks
    texts = torch.randn(2, 3, 5, wan.config.text_dim)
    frame_text = torch.tensor([[2, 0, 1], [1, 1, 0]])
    x = torch.randn(2, 3 * 4, wan.config.num_attention_heads * wan.config.attention_head_dim)
    grid = TokenGrid(3, 2, 2)
    with torch.no_grad():
        grouped = backbone.cross_attention(1, x, grid, backbone.text_kv(texts), frame_text)
        for b in range(2):
            for f in range(3):
                g = int(frame_text[b, f])
                states = wan.condition_embedder.text_embedder(texts[b:b + 1, g])
                alone = blocks[1].attn2(x[b:b + 1, f * 4:(f + 1) * 4], states)
                assert (grouped[b, f * 4:(f + 1) * 4] - alone[0]).abs().max().item() <= 1e-5


def test_gradient_checkpointing_keeps_values_and_gradients(wan):
    backbone = WanBackbone(wan)
    x = torch.randn(1, 4, 2, 4, 4)
    t = torch.tensor([300.0])
    text = torch.randn(1, 5, wan.config.text_dim)
    grads = []
    for enabled in (False, True):
        backbone.gradient_checkpointing = enabled
        wan.zero_grad()
        backbone(x, t, torch.arange(2), backbone.text_kv(text)).square().mean().backward()
        grads.append(wan.blocks[0].attn1.to_q.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_shape_errors_name_both_shapes(wan):
    backbone = WanBackbone(wan)
    text = backbone.text_kv(torch.randn(1, 5, wan.config.text_dim))
    bad_channels = torch.randn(1, 8, 3, 16, 16)
    with pytest.raises(ValueError, match=r"latents have 8 channels but the model expects 4 \(in_channels\); "
                                         r"got latents \[1, 8, 3, 16, 16\]"):
        backbone(bad_channels, torch.tensor([1.0]), torch.arange(3), text)
    with pytest.raises(ValueError, match=r"latents \[1, 4, 3, 15, 16\] does not fit the model's patch size "
                                         r"\[1, 2, 2\]: height 15 is not divisible by 2"):
        backbone(torch.randn(1, 4, 3, 15, 16), torch.tensor([1.0]), torch.arange(3), text)
