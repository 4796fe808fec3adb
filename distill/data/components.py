"""Recipe sections → the data components (codec, text encoder, synth settings, prepared folder).

The one place that reads `codec.*`, `text_encoder.*` and `data.synth.*`, so that `teacher/` keeps
taking explicit arguments and every consumer resolves the prepared folder the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from distill import layout
from distill.data.datasets import PromptDataset, ShotDataset
from distill.data.stream import DataStream
from distill.data.synth import SynthSettings
from distill.data.memory import memory_settings
from distill.data.world import grammar_texts
from student.memory import MemoryRule, similarity_from
from teacher.context import RANKED
from teacher.encoders import (DTYPES, Codec, PatchCodec, T5TextEncoder, WanVAECodec, build_tiny_t5,
                              vocabulary_of)



def prepared_dir(cfg: DictConfig) -> Path:
    """Where prepared shards live: `data.prepared`, or the prepare stage's folder of this run."""
    if cfg.data.prepared:
        return Path(cfg.data.prepared)
    return layout.run_dir(cfg.run.out, cfg.run.name) / layout.PREPARE


def build_codec(codec: DictConfig, device: str | torch.device = "cpu") -> Codec:
    if codec.kind == "patch":
        return PatchCodec(codec.patch, codec.mean, codec.std)
    if not codec.path:
        raise ValueError("codec.path: the Wan VAE folder is required when codec.kind is 'wan'")
    return WanVAECodec.from_pretrained(codec.path, device=device, dtype=DTYPES[codec.dtype])


def memory_rule(cfg: DictConfig) -> MemoryRule | None:
    """The recipe's ranked context rule (data.context, student/memory.py), or None for the frame-count
    strategies (dynamic, first, first_last). A clip scorer sees prepared latents through the codec."""
    c = cfg.data.context
    if c.strategy not in RANKED:
        return None
    s = memory_settings(cfg)
    scorer = similarity_from(s["similarity"], s["similarity_path"], s["similarity_terms"])
    decode = None
    if scorer.needs_images:
        codec = build_codec(cfg.codec)
        decode = lambda latents: codec.decode(latents[None, :, None].float())[0, :, 0]  # noqa: E731
    return MemoryRule(c.strategy, c.budget, scorer, c.pack_frames, c.max_candidates, decode)


def build_text_encoder(text: DictConfig, device: str | torch.device = "cpu") -> T5TextEncoder:
    if text.kind == "tiny_t5":
        enc = build_tiny_t5(vocabulary_of(grammar_texts()), text.dim, text.layers, text.heads,
                            text.max_tokens, text.seed)
        enc.model.to(device)
        return enc
    if not text.path:
        raise ValueError("text_encoder.path: the UMT5 folder is required when text_encoder.kind is 'umt5'")
    return T5TextEncoder.from_pretrained(text.path, text.max_tokens, device=device,
                                         dtype=DTYPES[text.dtype])


def negative_text(cfg: DictConfig, device: str | torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[1, L, D]: `sampler.negative_prompt`, the unconditional text of CFG, in the model text layout
    (a blank prompt: zeros, what text dropout trains the unconditional branch on).
    Encoded on the CPU: a UMT5-XXL on the GPU would hold ~11 GB for one prompt."""
    prompt = cfg.sampler.negative_prompt
    text = build_text_encoder(cfg.text_encoder, "cpu").model_text([prompt] if prompt.strip() else [])
    return text.unsqueeze(0).to(device, dtype)


def synth_settings(synth: DictConfig) -> SynthSettings:
    return SynthSettings(videos=synth.videos, seed=synth.seed, height=synth.height, width=synth.width,
                         fps=synth.fps, min_shots=synth.min_shots, max_shots=synth.max_shots,
                         min_frames=synth.min_frames, max_frames=synth.max_frames,
                         max_cast=synth.max_cast, speed=synth.speed, captions=synth.captions,
                         sprite_scale=synth.sprite_scale)


def shot_stream(cfg: DictConfig, rank: int, world: int, limit: int | None = None) -> DataStream:
    """Next-shot micro-batches (teacher, intra-shot) of this rank, context per `data.context` (negative
    context and trained references included; `limit`: at most that many context frames)."""
    negative, refs = cfg.data.context.negative, cfg.data.context.references
    mixed = (negative.p, negative.frames, cfg.run.seed) if negative.p > 0 else None
    crops = (refs.p, refs.max, cfg.run.seed) if refs.p > 0 else None
    dataset = ShotDataset(prepared_dir(cfg), cfg.data.context.strategy, cfg.data.context.budget, mixed, limit,
                          crops, memory_rule(cfg))
    return DataStream(dataset, cfg.train.micro_batch, cfg.run.seed, rank, world)


def prompt_stream(cfg: DictConfig, rank: int, world: int, shots: int | None = None) -> DataStream:
    """Multi-shot caption prompts (inter-shot) of this rank; `shots` fixes the shots per prompt."""
    return DataStream(PromptDataset(prepared_dir(cfg), shots), cfg.train.micro_batch, cfg.run.seed, rank, world)
