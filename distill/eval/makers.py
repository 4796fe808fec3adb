"""Models as multi-shot video makers: one protocol, a student maker over a serving export, the teacher's.

A `VideoMaker` is called as (prompt, seed) -> `Video` and carries its frame rate and a `source`
entry naming the model for report.json; `distill.eval.scoring.score_videos` scores any of them.

The student (`load_student_maker`) is the serving export generated shot by shot by a
`StreamingGenerator` (global caption as its global prompt, the seed as its seed), exactly as serving
runs it, each shot at the export's training length; `first_chunk_s` is the time from the first
shot's request to its first decoded chunk, `seconds` the whole generation.

The teacher (`load_teacher_maker`): a teacher stage folder holds the trained model (`model/`) and
the resolved recipe it trained with (`config.yaml`); from that recipe come the sampler (`sampler.*`:
steps, shift, guidance and its negative prompt), the codec, the text encoder, the shot length
(`data.shot_frames`), the frame rate and the context rule (`data.context.*`, the rule the student is
initialised with). A prompt's shots are sampled one after another by
`distill.eval.multishot.teacher_shots`, each later shot conditioned on frames of the teacher's own
earlier shots picked by that rule (latent frames when the codec's frames are latents, else decoded
frames re-encoded one by one, as the streaming student does). The model text of a shot is the global
caption's tokens ⊕ the shot caption's, zero-padded, as the student's. Timing matches the student's:
from the first caption's encoding to the first decoded shot (`first_chunk_s`: the teacher's first
frames come with its whole first shot) and to the last.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Protocol

import torch
from omegaconf import DictConfig

from distill.eval.prompts import Prompt
from distill.rollout import ContextFn
from teacher.encoders import DTYPES, Codec, T5TextEncoder, pixels_to_uint8

if TYPE_CHECKING:
    from student.generator import VideoSettings


@dataclass
class Video:
    frames: torch.Tensor  # uint8 [F, H, W, 3]
    shot_lengths: list[int]
    first_chunk_s: float
    seconds: float


class VideoMaker(Protocol):
    """(prompt, seed) -> the prompt's multi-shot video, timed around generation only."""

    fps: float  # frame rate of the videos it makes
    source: dict  # what report.json says the videos came from, e.g. {"export": folder}

    def __call__(self, prompt: Prompt, seed: int) -> Video: ...


@dataclass
class StudentVideoMaker:
    """A serving export's student and components; call it as (prompt, seed) -> Video."""

    student: torch.nn.Module
    codec: Codec
    text_encoder: T5TextEncoder
    video: VideoSettings
    source: dict

    @property
    def fps(self) -> float:
        return self.video.fps

    def __call__(self, prompt: Prompt, seed: int) -> Video:
        """All shots of `prompt`, streamed shot by shot; seconds count generation only."""
        from student.generator import StreamingGenerator

        gen = StreamingGenerator(self.student, self.codec, self.text_encoder, self.video,
                                 global_prompt=prompt.global_caption, seed=seed)
        chunks, lengths, first = [], [], None
        start = time.perf_counter()
        for caption in prompt.captions:
            made = 0
            for chunk in gen.next_shot(caption):
                first = time.perf_counter() - start if first is None else first
                chunks.append(chunk)
                made += chunk.shape[0]
            lengths.append(made)
        seconds = time.perf_counter() - start
        return Video(torch.cat(chunks), lengths, first, seconds)


def load_student_maker(export: str | Path, device: str | torch.device, dtype: str) -> StudentVideoMaker:
    """The student of a serving export folder, in `dtype` (a recipe dtype name), ready to make videos."""
    from student.folder import read_folder
    from student.generator import load_components
    from student.model import CausalStudent

    info = read_folder(export)
    codec, text, video = load_components(info.components, info.folder, device)
    student = CausalStudent.from_pretrained(info.folder, torch_dtype=DTYPES[dtype]).to(device)
    return StudentVideoMaker(student, codec, text, video, {"export": str(info.folder)})


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
    fps: float
    source: dict
    caption_layout: str

    def text(self, global_caption: str, captions: list[str]) -> torch.Tensor:
        """[1, L, D]: the model text of the last of `captions` (the shots so far) in the training layout,
        on the teacher's device."""
        device = next(self.teacher.parameters()).device
        text = self.text_encoder.prompt_text(self.caption_layout, global_caption, captions)
        return text[None].to(device, self.dtype)

    def __call__(self, prompt: Prompt, seed: int) -> Video:
        from distill.eval.multishot import teacher_shots

        gen = torch.Generator().manual_seed(seed)
        frames, lengths, first = [], [], None
        start = time.perf_counter()
        texts: Iterator[torch.Tensor] = (self.text(prompt.global_caption, prompt.captions[:k + 1])
                                         for k in range(len(prompt.captions)))
        with torch.no_grad():
            for latents in teacher_shots(self.teacher, self.shape, self.sampler, self.negative, self.context_fn,
                                         texts, gen, [prompt.captions]):
                shot = pixels_to_uint8(self.codec.decode(latents.float())[0]).cpu()
                first = time.perf_counter() - start if first is None else first
                frames.append(shot)
                lengths.append(shot.shape[0])
        return Video(torch.cat(frames), lengths, first, time.perf_counter() - start)


def load_teacher_maker(stage: str | Path, device: str | torch.device, dtype: str) -> TeacherVideoMaker:
    """The teacher of a finished teacher stage folder, in `dtype` (a recipe dtype name), ready to make videos."""
    from distill.config import load_recipe
    from distill.data.components import build_codec, build_text_encoder, memory_rule
    from distill.eval.multishot import guided_negative
    from distill.models import load_teacher
    from distill.rollout import context_function
    from distill import layout

    stage = Path(stage)
    cfg = load_recipe(stage / layout.CONFIG)
    torch_dtype = DTYPES[dtype]
    teacher = load_teacher(layout.product(stage, "teacher")).to(device, torch_dtype).eval()
    codec = build_codec(cfg.codec, device)
    encoder = build_text_encoder(cfg.text_encoder, device)
    shape = (codec.channels, codec.latent_frames(cfg.data.shot_frames), cfg.data.height // codec.spatial_factor,
             cfg.data.width // codec.spatial_factor)
    rule = cfg.data.context
    context_fn = context_function(rule.strategy, rule.budget, memory_rule(cfg), codec, codec.frames_are_latents)
    negative = guided_negative(cfg, device, torch_dtype)
    return TeacherVideoMaker(teacher, codec, encoder, shape, cfg.sampler, negative, context_fn, torch_dtype,
                             float(cfg.data.fps), {"teacher": str(stage)}, cfg.text_encoder.caption_layout)
