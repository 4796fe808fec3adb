"""Run a diffusers WanTransformer3DModel's own modules with our positions, timesteps, text and attention.

The backbone owns no weights: it drives `wan.patch_embedding`, `wan.condition_embedder`, each
block's `norm1/attn1/norm2/attn2/norm3/ffn/scale_shift_table`, and `wan.norm_out/proj_out` so that a
Wan2.1 diffusers folder loads as is. On top of diffusers' forward it lets the caller choose:

- temporal positions per latent frame (floats, shot RoPE), per batch row or shared;
- timesteps per latent frame [B, F] (clean context frames at t = 0) or one per sample [B];
- text per frame: a few text groups [B, G, Lt, D] and an index `frame_text` [B, F] saying which
  group each frame's tokens cross-attend to;
- the self-attention function `attn(q, k, v)` on [B, L, H, D] tensors (bidirectional SDPA by
  default; chunk-causal or Triton for the student);
- a KV provider whose `extend(layer, k, v)` sees each block's keys/values (after norm_k and RoPE)
  and returns the keys/values to attend to (cache ⊕ current), for the causal student.

Timesteps are per latent frame rather than per token because every stage noises whole frames; the
modulation then stays [B, F, 6, D] and is broadcast over a frame's tokens without materialising it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from teacher.rope import apply_rotary, wan_rotary

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bidirectional attention on [B, L, H, D] tensors (the layout diffusers' Wan processor uses)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


class KVProvider(Protocol):
    """Hook into each block's self-attention keys/values (the student's KV cache implements it).

    `extend` receives the current tokens' k, v [B, L, H, D] (after norm_k and RoPE) of `layer` and
    returns the keys/values to attend to, e.g. cached ⊕ current; it may store the current ones.
    Under gradient checkpointing a block is recomputed in backward, so `extend` is called again
    for that layer and must then return the same tensors (store immutable tensors, never overwrite
    a cached tensor in place).
    """

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ...


@dataclass(frozen=True)
class TokenGrid:
    """Token grid of a latent clip after patching: frames × height × width tokens."""

    frames: int
    height: int
    width: int

    @property
    def per_frame(self) -> int:
        return self.height * self.width

    def tail(self, frames: int) -> "TokenGrid":
        """The grid of the last `frames` frames."""
        return TokenGrid(frames, self.height, self.width)


@dataclass
class TextKV:
    """Cross-attention keys/values of G texts for every block: lists of [B, G, Lt, H, Dh].

    Computed once per text (`WanBackbone.text_kv`) and reusable across calls, e.g. a shot's caption
    for all chunks and denoising steps of that shot.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def groups(self) -> int:
        return self.keys[0].shape[1]


@dataclass
class FrameConditioning:
    """Per-frame inputs of the blocks: time modulation, time embedding (for the head), RoPE tables."""

    modulation: torch.Tensor  # [B, F, 6, D]
    temb: torch.Tensor  # [B, F, D]
    rotary: tuple[torch.Tensor, torch.Tensor]  # each [1 or B, L, 1, head_dim]


class WanBackbone:
    """Drives the modules of a diffusers `WanTransformer3DModel` (held by reference, not owned)."""

    def __init__(self, wan: torch.nn.Module) -> None:
        cfg = wan.config
        if cfg.added_kv_proj_dim is not None or cfg.image_dim is not None:
            raise ValueError("Wan image-to-video transformers (image_dim/added_kv_proj_dim) are not supported")
        self.wan = wan
        self.patch_size = tuple(cfg.patch_size)
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.out_channels or cfg.in_channels
        self.heads = cfg.num_attention_heads
        self.num_layers = cfg.num_layers
        self.gradient_checkpointing = False
        # self-attention of forward() when the caller names none (the recipe's model.attention backend)
        self.attention: Attention = sdpa_attention

    def direct_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters this adapter reads as attributes, outside the forward of the module owning
        them (the modulation tables): ZeRO-3 must gather them for the whole pass."""
        return [self.wan.scale_shift_table, *(block.scale_shift_table for block in self.wan.blocks)]

    # ---- inputs -------------------------------------------------------------------------
    def check_latents(self, name: str, latents: torch.Tensor) -> TokenGrid:
        """Validate [B, C, F, H, W] latents against in_channels and the patch size; return the grid."""
        shape = list(latents.shape)
        if latents.ndim != 5:
            raise ValueError(f"{name} must be [B, C, F, H, W] latents; got {name} {shape}")
        if shape[1] != self.in_channels:
            raise ValueError(
                f"latents have {shape[1]} channels but the model expects {self.in_channels} "
                f"(in_channels); got {name} {shape}"
            )
        for axis, size, patch in zip(("frames", "height", "width"), shape[2:], self.patch_size):
            if size % patch:
                raise ValueError(
                    f"{name} {shape} does not fit the model's patch size {list(self.patch_size)}: "
                    f"{axis} {size} is not divisible by {patch}"
                )
        pt, ph, pw = self.patch_size
        return TokenGrid(shape[2] // pt, shape[3] // ph, shape[4] // pw)

    def embed(self, latents: torch.Tensor) -> torch.Tensor:
        """Patch-embed latents [B, C, F, H, W] into frame-major tokens [B, L, D]."""
        tokens = self.wan.patch_embedding(latents)
        return tokens.flatten(2).transpose(1, 2).contiguous()

    def conditioning(
        self, timesteps: torch.Tensor, positions: torch.Tensor, grid: TokenGrid, dtype: torch.dtype,
        phases: torch.Tensor | None = None,
    ) -> FrameConditioning:
        """Time modulation for timesteps [B] or [B, F] and RoPE tables for positions [F] or [B, F]
        with shot phases (radians, [F] or [B, F]; see teacher/rope.py)."""
        if positions.shape[-1] != grid.frames:
            raise ValueError(f"positions {list(positions.shape)} do not match {grid.frames} latent frames")
        temb, modulation = self.time_embedding(timesteps, grid.frames, dtype)
        rotary = wan_rotary(self.wan.rope, positions, grid.height, grid.width, phases)
        device = modulation.device
        return FrameConditioning(modulation, temb, (rotary[0].to(device), rotary[1].to(device)))

    def time_embedding(
        self, timesteps: torch.Tensor, frames: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """temb [B, F, D] and block modulation [B, F, 6, D], computed as diffusers' condition embedder."""
        if timesteps.ndim == 2 and timesteps.shape[1] != frames:
            raise ValueError(f"timesteps {list(timesteps.shape)} do not match {frames} latent frames")
        embedder = self.wan.condition_embedder
        t_freq = embedder.timesteps_proj(timesteps.flatten())
        embed_dtype = next(embedder.time_embedder.parameters()).dtype
        if t_freq.dtype != embed_dtype and embed_dtype != torch.int8:
            t_freq = t_freq.to(embed_dtype)
        temb = embedder.time_embedder(t_freq).to(dtype)
        modulation = embedder.time_proj(embedder.act_fn(temb)).unflatten(-1, (6, -1))
        batch = timesteps.shape[0]
        rows = frames if timesteps.ndim == 2 else 1
        temb = temb.view(batch, rows, -1).expand(batch, frames, -1)
        modulation = modulation.view(batch, rows, 6, -1).expand(batch, frames, 6, -1)
        return temb, modulation

    def text_kv(self, text: torch.Tensor) -> TextKV:
        """Cross-attention K/V per block for texts [B, Lt, Dt] (one group) or [B, G, Lt, Dt]."""
        groups = text.unsqueeze(1) if text.ndim == 3 else text
        batch, count = groups.shape[:2]
        states = self.wan.condition_embedder.text_embedder(groups.flatten(0, 1))
        keys, values = [], []
        for block in self.wan.blocks:
            attn = block.attn2
            k = attn.norm_k(attn.to_k(states)).unflatten(2, (self.heads, -1))
            v = attn.to_v(states).unflatten(2, (self.heads, -1))
            keys.append(k.unflatten(0, (batch, count)))
            values.append(v.unflatten(0, (batch, count)))
        return TextKV(keys, values)

    def frame_text_kv(
        self, text: torch.Tensor, context_text: torch.Tensor | None, target_frames: int
    ) -> tuple[TextKV, torch.Tensor | None]:
        """Cross-attention K/V of the distinct texts and each frame's text index (None: one text).

        context_text [B, Fc, L, D] is each context frame's own shot text (None: every frame uses
        `text`); the `target_frames` frames after the context use `text` [B, L, D]. Context frames
        of one shot share a text, so each distinct text's K/V is computed once; texts are compared
        by bit pattern (exact equality, and unique() lacks half-precision kernels on some devices).
        """
        if context_text is None or context_text.shape[1] == 0:
            return self.text_kv(text), None
        stacked = torch.cat([context_text.to(text.dtype), text.unsqueeze(1)], dim=1)
        flat = stacked.flatten(2)
        bits = flat.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])
        unique_bits, index = torch.unique(bits, dim=1, return_inverse=True)
        groups = unique_bits.view(stacked.dtype).unflatten(2, stacked.shape[2:])
        if groups.shape[1] == 1:
            return self.text_kv(text), None
        frame_text = torch.cat([index[:-1], index[-1:].expand(target_frames)]).to(text.device)
        return self.text_kv(groups), frame_text.unsqueeze(0)

    # ---- blocks -------------------------------------------------------------------------
    def run_blocks(
        self,
        tokens: torch.Tensor,
        grid: TokenGrid,
        cond: FrameConditioning,
        text: TextKV,
        frame_text: torch.Tensor | None = None,
        attn: Attention = sdpa_attention,
        kv: KVProvider | None = None,
    ) -> torch.Tensor:
        """Run every block on tokens [B, L, D]; frame_text [B, F] picks each frame's text group."""
        if text.groups > 1 and frame_text is None:
            raise ValueError(f"{text.groups} text groups were given but no frame_text index")
        if frame_text is not None and frame_text.shape[-1] != grid.frames:
            raise ValueError(f"frame_text {list(frame_text.shape)} does not match {grid.frames} latent frames")
        for layer in range(self.num_layers):
            args = (layer, tokens, grid, cond, text, frame_text, attn, kv)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(self.block, *args, use_reentrant=False)
            else:
                tokens = self.block(*args)
        return tokens

    def block(
        self,
        layer: int,
        x: torch.Tensor,
        grid: TokenGrid,
        cond: FrameConditioning,
        text: TextKV,
        frame_text: torch.Tensor | None,
        attn: Attention,
        kv: KVProvider | None,
    ) -> torch.Tensor:
        """One Wan block, numerically as diffusers' WanTransformerBlock, with per-frame modulation."""
        block = self.wan.blocks[layer]
        batch, length, dim = x.shape

        def frames(t: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, F, S, D] to meet [B, F, 1, D]
            return t.view(batch, grid.frames, grid.per_frame, dim)

        mod = block.scale_shift_table.unsqueeze(0) + cond.modulation.float()
        shift, scale, gate, c_shift, c_scale, c_gate = mod.chunk(6, dim=2)

        h = (frames(block.norm1(x.float())) * (1 + scale) + shift).view(batch, length, dim).type_as(x)
        out = self.self_attention(layer, h, cond.rotary, attn, kv)
        x = (frames(x.float()) + frames(out) * gate).view(batch, length, dim).type_as(x)

        h = block.norm2(x.float()).type_as(x)
        x = x + self.cross_attention(layer, h, grid, text, frame_text)

        h = (frames(block.norm3(x.float())) * (1 + c_scale) + c_shift).view(batch, length, dim).type_as(x)
        out = block.ffn(h)
        return (frames(x.float()) + frames(out.float()) * c_gate).view(batch, length, dim).type_as(x)

    def self_attention(
        self,
        layer: int,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attn: Attention,
        kv: KVProvider | None,
    ) -> torch.Tensor:
        """attn1 with RoPE; the KV provider sees (and may extend) the rotated keys and values."""
        module = self.wan.blocks[layer].attn1
        q = module.norm_q(module.to_q(x)).unflatten(2, (self.heads, -1))
        k = module.norm_k(module.to_k(x)).unflatten(2, (self.heads, -1))
        v = module.to_v(x).unflatten(2, (self.heads, -1))
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if kv is not None:
            k, v = kv.extend(layer, k, v)
        out = attn(q, k, v).flatten(2, 3).type_as(q)
        return module.to_out[1](module.to_out[0](out))

    def cross_attention(
        self, layer: int, x: torch.Tensor, grid: TokenGrid, text: TextKV, frame_text: torch.Tensor | None
    ) -> torch.Tensor:
        """attn2: each frame's tokens attend to the K/V of its text group, in one batched call."""
        module = self.wan.blocks[layer].attn2
        q = module.norm_q(module.to_q(x)).unflatten(2, (self.heads, -1))
        k, v = text.keys[layer], text.values[layer]
        if frame_text is None:
            out = sdpa_attention(q, k[:, 0], v[:, 0])
        else:
            batch = q.shape[0]
            index = frame_text.to(k.device).expand(batch, grid.frames)
            rows = torch.arange(batch, device=k.device).unsqueeze(1)
            q_frames = q.reshape(batch * grid.frames, grid.per_frame, *q.shape[2:])
            out = sdpa_attention(q_frames, k[rows, index].flatten(0, 1), v[rows, index].flatten(0, 1))
            out = out.reshape(q.shape)
        out = out.flatten(2, 3).type_as(q)
        return module.to_out[1](module.to_out[0](out))

    # ---- output -------------------------------------------------------------------------
    def head(self, tokens: torch.Tensor, temb: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
        """Output norm, projection and unpatchify: tokens [B, L, D] -> [B, C_out, F, H, W]."""
        wan = self.wan
        batch, length, dim = tokens.shape
        shift, scale = (wan.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
        normed = wan.norm_out(tokens.float()).view(batch, grid.frames, grid.per_frame, dim)
        x = (normed * (1 + scale) + shift).view(batch, length, dim).type_as(tokens)
        x = wan.proj_out(x)
        pt, ph, pw = self.patch_size
        x = x.reshape(batch, grid.frames, grid.height, grid.width, pt, ph, pw, -1)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def forward(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        positions: torch.Tensor,
        text: TextKV,
        frame_text: torch.Tensor | None = None,
        attn: Attention | None = None,
        kv: KVProvider | None = None,
        out_frames: int | None = None,
        phases: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Whole pass on latents [B, C, F, H, W]; returns the prediction for the last `out_frames`
        token frames (all when None). Frames here are token frames (latent frames / temporal patch,
        the same for Wan2.1): timesteps [B] or [B, F]; positions and shot phases [F] or [B, F]."""
        grid = self.check_latents("latents", latents)
        tokens = self.embed(latents)
        cond = self.conditioning(timesteps, positions, grid, tokens.dtype, phases)
        tokens = self.run_blocks(tokens, grid, cond, text, frame_text, attn or self.attention, kv)
        keep = grid.frames if out_frames is None else out_frames
        tail = grid.tail(keep)
        return self.head(tokens[:, -keep * grid.per_frame:], cond.temb[:, -keep:], tail)

    __call__ = forward
