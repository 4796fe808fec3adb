"""The next-shot teacher as a multi-shot video maker, so it is evaluated like a student export.

A teacher stage folder holds the trained model (`model/`) and the resolved recipe it trained with
(`config.yaml`); from that recipe come the sampler (`sampler.*`: steps, shift, guidance and its
negative prompt), the codec, the text encoder, the shot length (`data.shot_frames`), the frame rate
and the context rule (`data.context.*`, the rule the student is initialised with). A prompt's shots
are sampled one after another by `distill.eval.multishot.teacher_shots`, each later shot conditioned
on frames of the teacher's own earlier shots picked by that rule (latent frames when the codec's
frames are latents, else decoded frames re-encoded one by one, as the streaming student does). The
model text of a shot is the global caption's tokens ⊕ the shot caption's, zero-padded, as the
student's. Timing matches the student's: from the first caption's encoding to the first decoded
shot (`first_chunk_s`: the teacher's first frames come with its whole first shot) and to the last.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from omegaconf import DictConfig

from distill.eval.scoring import Prompt, Video, score_videos
from distill.rollout import ContextFn
from teacher.encoders import DTYPES, Codec, T5TextEncoder, join_text, pixels_to_uint8, text_length


@dataclass
class TeacherVideoMaker:
    """A loaded teacher with what it needs to make a prompt's video; call it as (prompt, seed) -> Video."""

    teacher: torch.nn.Module
    codec: Codec
    text_encoder: T5TextEncoder
    shape: tuple  # (C, F, h, w) latents of one shot
    sampler: DictConfig
    negative: torch.Tensor | None  # [1, L, D]
    context_fn: ContextFn
    dtype: torch.dtype

    def text(self, global_caption: str, caption: str) -> torch.Tensor:
        """[1, L, D]: the global caption's tokens ⊕ the shot caption's, zero-padded (the training layout)."""
        parts = [self.text_encoder.encode([c])[0] for c in (global_caption, caption) if c.strip()]
        length = text_length(self.text_encoder.max_tokens, 2)
        device = next(self.teacher.parameters()).device
        text = join_text(parts, length) if parts else torch.zeros(length, self.text_encoder.dim)
        return text[None].to(device, self.dtype)

    def __call__(self, prompt: Prompt, seed: int) -> Video:
        from distill.eval.multishot import teacher_shots

        gen = torch.Generator().manual_seed(seed)
        frames, lengths, first = [], [], None
        start = time.perf_counter()
        texts: Iterator[torch.Tensor] = (self.text(prompt.global_caption, c) for c in prompt.captions)
        with torch.no_grad():
            for latents in teacher_shots(self.teacher, self.shape, self.sampler, self.negative, self.context_fn,
                                         texts, gen):
                shot = pixels_to_uint8(self.codec.decode(latents.float())[0]).cpu()
                first = time.perf_counter() - start if first is None else first
                frames.append(shot)
                lengths.append(shot.shape[0])
        return Video(torch.cat(frames), lengths, first, time.perf_counter() - start)


def load_teacher_maker(stage: str | Path, device: str | torch.device, dtype: str) -> tuple[TeacherVideoMaker, float]:
    """The teacher of a finished teacher stage folder, ready to make videos, and its frame rate."""
    from distill.config import load_recipe
    from distill.data.components import build_codec, build_text_encoder
    from distill.models import load_teacher
    from distill.rollout import ReencodedContext, latent_context_fn
    from distill.eval.probes import negative_text
    from distill.stages.teacher import MODEL_DIR

    stage = Path(stage)
    cfg = load_recipe(stage / "config.yaml")
    torch_dtype = DTYPES[dtype]
    teacher = load_teacher(stage / MODEL_DIR).to(device, torch_dtype).eval()
    codec = build_codec(cfg.codec, device)
    encoder = build_text_encoder(cfg.text_encoder, device)
    shape = (codec.channels, codec.latent_frames(cfg.data.shot_frames), cfg.data.height // codec.spatial_factor,
             cfg.data.width // codec.spatial_factor)
    rule = cfg.data.context
    context_fn = latent_context_fn(rule.strategy, rule.budget) if codec.frames_are_latents \
        else ReencodedContext(codec, rule.strategy, rule.budget)
    negative = negative_text(cfg, text_length(encoder.max_tokens, 2), device, torch_dtype)
    maker = TeacherVideoMaker(teacher, codec, encoder, shape, cfg.sampler, negative, context_fn, torch_dtype)
    return maker, float(cfg.data.fps)


def evaluate_teacher(stage: str | Path, prompts: list[Prompt], out: str | Path, ev, device: str | torch.device,
                     seed: int, rank: int = 0, world: int = 1) -> dict[str, float]:
    """`distill.eval.scoring.evaluate` for a teacher stage folder: same prompts, seeds, scoring and report."""
    maker, fps = load_teacher_maker(stage, device, ev.dtype)
    return score_videos(maker, fps, prompts, out, ev, device, seed, None, rank, world, {"teacher": str(stage)})
