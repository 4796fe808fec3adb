"""Few-step, chunk-by-chunk sampling through the KV caches: the one stepping loop every caller reuses.

Inference (StreamingGenerator), ODE-pair checks and Self Forcing rollouts all run a shot the same way:

    stream.begin_shot(text, context)          # text K/V once; global cache rebuilt from a Context
    for each chunk: x0 = stream.next_chunk(generator)               # denoising steps, then the t = 0 pass

`denoise_chunk` is the per-chunk loop (CausVid / Self Forcing convention): from pure noise, at each
step x0 = x_t − σ·v, then re-noise to the next step's σ' with fresh noise from the generator,
x = (1 − σ')·x0 + σ'·ε; the last step's x0 is the chunk. With `exit_step` (Self Forcing) the steps
before it run without gradient and the exit step's x0 (with gradient) is the chunk.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from student.cache import CacheShape, KVCache
from student.compiled import FixedChunkPasses, check_mode, compile_regions
from student.context import Context, pick_context
from student.model import CausalStudent
from teacher.backbone import TextKV, sdpa_attention
from teacher.flow import add_noise, shift_timestep, x0_from_velocity
from teacher.rope import shot_positions
from teacher.sampler import draw_noise

# (x_t [B, C, F, H, W], t [B]) -> velocity
Predictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def denoising_timesteps(steps: Sequence[float], shift: float) -> list[float]:
    """The student's timesteps warped through the shift (1000, 750, 500, 250 → 1000, 937.5, 833.3, 625 at 5)."""
    return [float(t) for t in shift_timestep(torch.tensor([float(s) for s in steps], dtype=torch.float64), shift)]


def denoise_chunk(predict: Predictor, noise: torch.Tensor, timesteps: Sequence[float],
                  generator: torch.Generator | None, exit_step: int | None = None,
                  renoise: torch.Tensor | None = None) -> torch.Tensor:
    """x0 of one chunk (float32) from `noise` [B, C, F, H, W] (see module doc); `generator` draws the
    re-noising ε (None: the global RNG), or every re-noising uses `renoise` (a probe that makes the
    sample a function of its noise). The state is kept in float32 whatever the model dtype."""
    last = len(timesteps) - 1 if exit_step is None else exit_step
    if not 0 <= last < len(timesteps):
        raise ValueError(f"exit_step {exit_step} is outside the {len(timesteps)} denoising steps")
    x = noise.float()
    at = lambda t_now: torch.full((noise.shape[0],), t_now, device=noise.device, dtype=torch.float32)  # noqa: E731
    for i, t_now in enumerate(timesteps[:last + 1]):
        with torch.set_grad_enabled(torch.is_grad_enabled() and (exit_step is None or i == last)):
            v = predict(x.to(noise.dtype), at(t_now)).float()
            x0 = x0_from_velocity(x, v, at(t_now))
        if i == last:
            return x0
        if renoise is not None:
            eps = renoise.float()
        else:
            eps = draw_noise(x.shape, generator, device=noise.device) if generator is not None \
                else torch.randn(x.shape, device=noise.device)
        x = add_noise(x0, eps, at(timesteps[i + 1]))
    raise AssertionError("unreachable")


class ChunkStream:
    """One stream of B rows generated shot by shot, chunk by chunk, through a student's KV caches.

    keep_graph: the cache keeps tensors (with their graph) instead of writing a preallocated buffer
    in place; use it for rollouts that backpropagate (see student/cache.py for the policy).
    compile: none | regions | compile | cudagraph, how the chunk passes run (student/compiled.py).
    """

    def __init__(self, student: CausalStudent, batch: int, height: int, width: int, keep_graph: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 compile: str = "none") -> None:
        param = next(student.parameters())
        self.student, self.batch, self.height, self.width = student, batch, height, width
        # the compute dtype: a bf16 Wan loaded by diffusers keeps its norms and embedders in float32
        self.device, self.dtype = device or param.device, dtype or student.transformer.dtype
        s, cfg = student.settings, student.transformer.config
        pt = student.backbone.patch_size[0]
        self.cache = KVCache(CacheShape(
            layers=cfg.num_layers, batch=batch, heads=cfg.num_attention_heads, head_dim=cfg.attention_head_dim,
            frame_tokens=student.frame_tokens(height, width), chunk_frames=s.chunk_frames // pt,
            global_frames=s.context_frames // pt, local_chunks=s.local_chunks, kernels=tuple(s.local_compression),
            grid=student.token_grid(height, width)), self.dtype, self.device, keep_graph)
        self.timesteps = denoising_timesteps(s.denoising_steps, s.shift)
        self.text = None
        self.frame_start = 0  # latent frames before the shot's first frame (the context)
        self.shot = torch.zeros(batch, 1, dtype=torch.float64, device=self.device)
        self.chunk = 0
        self.compile = check_mode(compile, self.device)
        if compile == "regions":
            compile_regions(student)
        self.fixed = FixedChunkPasses(student, self.cache, compile) if compile in ("compile", "cudagraph") else None

    # ---- shots ------------------------------------------------------------------------------
    def begin_shot(self, text: torch.Tensor, context: Context | None = None, grad: bool = False) -> None:
        """Start a shot: its text's cross-attention K/V (once), the global cache rebuilt from the clean
        context latents [B, C, Fc, H, W] by one t = 0 pass, and the local cache cleared. The context
        pass runs without gradient unless `grad` (keep_graph only: then it backpropagates like the
        prefix of the full-sequence forward)."""
        student = self.student
        fc = 0 if context is None else context.frames
        latents, context_text = (None, None) if context is None else (context.latents, context.texts)
        if context is not None and tuple(latents.shape) != (self.batch, student.latent_channels, fc,
                                                            self.height, self.width):
            raise ValueError(f"context {list(latents.shape)} does not fit the stream "
                             f"[{self.batch}, {student.latent_channels}, Fc, {self.height}, {self.width}]")
        shots = student.context_shot_index(self.batch, fc, context_text,
                                           None if context is None else context.shots, self.device)
        text_kv, frame_text = student.text_conditioning(text, context_text, fc, 1)
        if frame_text is not None:  # the context pass uses every group, the shot's chunks only its own
            frame_text, group = frame_text[:, :fc], int(frame_text[0, -1])
            # fresh contiguous strides (size-1 dims included): those of a one-text shot, so that a
            # compiled chunk pass is not recompiled at the first shot with history
            dense = lambda t: t[:, group:group + 1].clone(memory_format=torch.contiguous_format)  # noqa: E731
            target_kv = TextKV([dense(k) for k in text_kv.keys], [dense(v) for v in text_kv.values])
        else:
            target_kv = text_kv
        writer = self.cache.context_pass(fc // student.backbone.patch_size[0])
        if fc:
            positions, phases = shot_positions(shots, student.settings.position_theta)
            timesteps = torch.zeros(self.batch, fc, device=self.device)
            with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
                student.run(latents.to(self.dtype), timesteps, positions, text_kv, frame_text,
                            sdpa_attention, writer, phases=phases)
        self.cache.finish(writer)
        self.text = target_kv
        self.frame_start, self.chunk = fc, 0
        self.shot = (shots.max(dim=1, keepdim=True).values + 1).double() if fc else \
            torch.zeros(self.batch, 1, dtype=torch.float64, device=self.device)

    def begin_shot_after(self, text: torch.Tensor, shots: Sequence[torch.Tensor],
                         shot_texts: Sequence[torch.Tensor], grad: bool = False) -> None:
        """`begin_shot` with the context sampled from the finished shots' latents by the student's
        context rule (`context_strategy`, `context_frames`); no shots: the stream's first shot."""
        s = self.student.settings
        self.begin_shot(text, latent_context(shots, shot_texts, s.context_strategy, s.context_frames), grad)

    # ---- chunks -----------------------------------------------------------------------------
    def _pass(self, x: torch.Tensor, t: torch.Tensor, commit: bool) -> torch.Tensor | None:
        """One pass of the student on the current chunk x [B, C, chunk, H, W] at timesteps t [B]."""
        if self.text is None:
            raise RuntimeError("begin_shot must be called before generating chunks")
        student, frames = self.student, self.student.settings.chunk_frames
        start = self.frame_start + self.chunk * frames
        positions = torch.arange(start, start + frames, dtype=torch.float64, device=self.device)
        phases = (self.shot * student.settings.position_theta).expand(self.batch, frames)
        timesteps = t.to(self.device).unsqueeze(1).expand(self.batch, frames) if t.ndim == 1 else t
        marked = (0, frames) if self.chunk == 0 and self.frame_start else None
        if self.fixed is not None:
            return self.fixed(x, timesteps, positions, phases, self.text, marked is not None, 0 if commit else frames)
        writer = self.cache.chunk_pass(commit)
        out = student.run(x, timesteps, positions, self.text, None, sdpa_attention, writer, marked,
                          out_frames=0 if commit else frames, phases=phases)
        self.cache.finish(writer)
        return out

    def predict(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Velocity of the current chunk at timesteps t ([B] or [B, chunk]), attending to the caches."""
        return self._pass(x, t, commit=False)

    def commit(self, x: torch.Tensor, t: torch.Tensor | None = None, grad: bool = False) -> None:
        """The pass that writes the chunk's keys/values into the local cache and moves to the next
        chunk: at t = 0 on the finished chunk (inference); `grad` keeps its graph (keep_graph only)."""
        t = torch.zeros(self.batch, device=self.device) if t is None else t
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            self._pass(x.to(self.dtype), t, commit=True)
        self.chunk += 1

    def next_chunk(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                   exit_step: int | None = None, renoise: torch.Tensor | None = None) -> torch.Tensor:
        """Generate the shot's next chunk [B, C, chunk, H, W] (float32): the denoising steps (up to
        `exit_step`), then the t = 0 pass that caches its clean K/V. Noise (initial and re-noising)
        comes from `generator`, unless given (`noise`, `renoise`: see `denoise_chunk`)."""
        shape = (self.batch, self.student.latent_channels, self.student.settings.chunk_frames,
                 self.height, self.width)
        if noise is None:
            noise = draw_noise(shape, generator, device=self.device) if generator is not None \
                else torch.randn(shape, device=self.device)
        x0 = denoise_chunk(self.predict, noise.to(self.dtype), self.timesteps, generator, exit_step, renoise)
        self.commit(x0.detach())
        return x0


def latent_context(shots: Sequence[torch.Tensor], shot_texts: Sequence[torch.Tensor], strategy: str,
                   budget: int) -> Context | None:
    """Context for the next shot from finished shots' latents [B, C, F_k, H, W] and texts [B, L, D]:
    latent frames chosen by the sampling rule (codecs whose temporal factor is 1; with Wan's VAE
    callers re-encode chosen pixel frames instead)."""
    return pick_context([s.shape[2] for s in shots], strategy, budget, lambda k, f: shots[k][:, :, f],
                        lambda k: shot_texts[k])
