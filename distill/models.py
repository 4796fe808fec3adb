"""Recipe → the models: the Wan transformer, the next-shot teacher, the causal student and the
components a student folder describes (teacher, ODE, causal-init, DMD and export stages).

`model.path` set: a Wan2.1 diffusers transformer is loaded and checked against the codec's latent
channels and the text encoder's width. `model.path` empty: a random Wan is built from `model.*`,
with in_channels taken from the codec and text_dim from the text encoder, so the tiny world's
shapes follow its codec and encoder settings instead of being written twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig

from distill.data.memory import memory_settings
from kernels import attention_function
from student.model import CausalStudent
from teacher.encoders import component_folder
from teacher.model import NextShotTeacher


def _json(folder: Path, what: str) -> dict:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} config not found") from None


def latent_channels(codec: DictConfig) -> int:
    """Channels of the codec's latents: 3·patch² for PatchCodec, the VAE's z_dim for Wan."""
    if codec.kind == "patch":
        return 3 * codec.patch * codec.patch
    if not codec.path:
        raise ValueError("codec.path: the Wan VAE folder is required when codec.kind is 'wan'")
    return int(_json(component_folder(codec.path, "vae"), "codec.path VAE")["z_dim"])


def text_dim(text: DictConfig) -> int:
    """Width of the text encoder's embeddings (the transformer's text_dim)."""
    if text.kind == "tiny_t5":
        return int(text.dim)
    if not text.path:
        raise ValueError("text_encoder.path: the UMT5 folder is required when text_encoder.kind is 'umt5'")
    return int(_json(component_folder(text.path, "text_encoder"), "text_encoder.path UMT5")["d_model"])


def wan_config(cfg: DictConfig) -> dict:
    """WanTransformer3DModel arguments of a random Wan built from `model.*`, codec and text encoder."""
    m = cfg.model
    if len(m.patch_size) != 3 or min(m.patch_size) < 1:
        raise ValueError(f"model.patch_size must be 3 positive integers, got {list(m.patch_size)}")
    if m.head_dim % 2 or m.head_dim < 6:
        # Wan splits a head's rotary dims between time, height and width (d - 4(d//6), 2(d//6), 2(d//6)).
        raise ValueError(f"model.head_dim must be even and >= 6, got {m.head_dim}")
    channels = latent_channels(cfg.codec)
    values = channels * m.patch_size[0] * m.patch_size[1] * m.patch_size[2]
    if m.heads * m.head_dim < values:
        # The velocity of a token is a linear image of its hidden state: narrower than the token's
        # latent values, part of the noise can never be predicted and survives every sampling step.
        raise ValueError(f"model.heads x model.head_dim = {m.heads * m.head_dim} is narrower than the "
                         f"{values} latent values of a token (codec channels x model.patch_size)")
    return dict(patch_size=tuple(m.patch_size), num_attention_heads=m.heads, attention_head_dim=m.head_dim,
                in_channels=channels, out_channels=channels, text_dim=text_dim(cfg.text_encoder),
                freq_dim=m.freq_dim, ffn_dim=m.ffn_dim, num_layers=m.layers, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6)


def build_wan(cfg: DictConfig) -> torch.nn.Module:
    """The recipe's Wan transformer in fp32: loaded from `model.path`, or random (seeded by the caller)."""
    from diffusers import WanTransformer3DModel

    if not cfg.model.path:
        return WanTransformer3DModel(**wan_config(cfg))
    folder = component_folder(cfg.model.path, "transformer")
    wan = WanTransformer3DModel.from_pretrained(str(folder), torch_dtype=torch.float32)
    channels, width = latent_channels(cfg.codec), text_dim(cfg.text_encoder)
    if (wan.config.out_channels or wan.config.in_channels) != channels:
        raise ValueError(f"model.path {folder}: the transformer outputs {wan.config.out_channels} latent "
                         f"channels but the codec makes {channels}")
    if wan.config.text_dim != width:
        raise ValueError(f"model.path {folder}: the transformer's text_dim {wan.config.text_dim} does not "
                         f"match the text encoder's width {width}")
    return wan


def teacher_settings(cfg: DictConfig) -> dict:
    """NextShotTeacher keyword settings from `teacher.*`."""
    t = cfg.teacher
    return dict(injection=t.injection, captions=t.captions, positions=t.positions, theta=t.theta,
                trainable=t.trainable, context_timestep=t.context_timestep)


def use_attention(model: NextShotTeacher | CausalStudent, backend: str) -> NextShotTeacher | CausalStudent:
    """Set a model's self-attention backend (`model.attention`, kernels/dispatch.py): a teacher's dense
    attention, a student's chunk-causal one (its cached decoding is dense over the cache: SDPA)."""
    if isinstance(model, CausalStudent):
        model.attention_backend = backend
    else:
        model.backbone.attention = attention_function(backend, dense=True)
    return model


def build_teacher(cfg: DictConfig) -> NextShotTeacher:
    """A fresh next-shot teacher around the recipe's Wan (the teacher stage's starting point)."""
    return use_attention(NextShotTeacher(build_wan(cfg), **teacher_settings(cfg)), cfg.model.attention)


def load_teacher(folder: str | Path, attention: str = "auto") -> NextShotTeacher:
    """A trained teacher saved by the teacher stage (`<teacher stage>/model`), with its own settings
    and the self-attention backend `attention` (`model.attention`)."""
    return use_attention(NextShotTeacher.from_pretrained(folder, torch_dtype=torch.float32), attention)


def save_teacher(engine, folder: str | Path, env) -> None:
    """Rank 0 writes a trained teacher engine's module as a diffusers folder (ZeRO-3 shards gathered first)."""
    from distill.distributed import barrier
    from distill.trainer import gathered

    with gathered(engine):
        if env.is_main:
            engine.module.save_pretrained(folder)
    barrier()


def check_student_keys(cfg: DictConfig) -> None:
    """The `student.*` keys omegaconf cannot range-check, before any compute (ValueError naming the key)."""
    from student.settings import StudentSettings

    s = cfg.student
    if s.shift <= 0:
        raise ValueError(f"student.shift must be > 0, got {s.shift}")
    StudentSettings(chunk_frames=s.chunk_frames, local_chunks=s.local_chunks,
                    local_compression=list(s.local_compression), denoising_steps=list(s.denoising_steps),
                    shift=s.shift).check()


def build_student(cfg: DictConfig, teacher: NextShotTeacher) -> CausalStudent:
    """The one build of the recipe's student (`student.*` and the context rule `data.context`; theta,
    captions and an "auto" indicator follow the teacher) around the teacher's transformer (shared, not
    copied), all parameters trainable."""
    s = cfg.student
    student = CausalStudent.from_teacher(
        teacher, chunk_frames=s.chunk_frames, copy=False,
        indicator=None if s.indicator == "auto" else s.indicator, local_chunks=s.local_chunks,
        local_compression=list(s.local_compression),
        context_frames=cfg.data.context.budget, context_strategy=cfg.data.context.strategy,
        denoising_steps=list(s.denoising_steps), shift=s.shift, caption_layout=cfg.text_encoder.caption_layout,
        **memory_settings(cfg))
    student.requires_grad_(True)
    student.enable_gradient_checkpointing(cfg.train.gradient_checkpointing)
    return use_attention(student, cfg.model.attention)


def student_components(cfg: DictConfig) -> dict:
    """The codec, text encoder and video a student folder describes, from the recipe. Wan components
    are folders on disk (referenced by a stage folder, copied by a serving export); the tiny random
    text encoder exists nowhere else, so it is given as an object to save inside."""
    from distill.data.components import build_text_encoder

    c, t = cfg.codec, cfg.text_encoder
    codec = {"kind": "patch", "patch": int(c.patch), "mean": float(c.mean), "std": float(c.std)} if c.kind == "patch" else \
        {"kind": "wan", "path": str(component_folder(c.path, "vae")), "dtype": c.dtype}
    text = build_text_encoder(t) if t.kind == "tiny_t5" else \
        {"kind": "umt5", "path": str(Path(t.path).resolve()), "max_tokens": int(t.max_tokens), "dtype": t.dtype}
    video = {"height": int(cfg.data.height), "width": int(cfg.data.width), "fps": float(cfg.data.fps),
             "frames": int(cfg.data.shot_frames)}
    return {"codec": codec, "text_encoder": text, "video": video}


def save_stage_student(engine, student: CausalStudent, folder: Path, cfg: DictConfig, env) -> None:
    """Rank 0 writes a stage's trained student folder (ZeRO-3 parameters gathered first); its components
    are referenced where they are, never copied (student/folder.py)."""
    from distill.distributed import barrier
    from distill.trainer import gathered
    from student.export import save_student

    components = student_components(cfg)
    with gathered(engine):
        if env.is_main:
            save_student(student, folder, components)
    barrier()


def load_stage_student(folder: Path, cfg: DictConfig, env) -> CausalStudent:
    """The student folder a stage just saved, as a plain float32 module on this rank's device: what the
    probes after training run. (Under ZeRO-3 the engine's module must never run outside the engine's
    own forward: its parameter hooks would fetch and release out of step with a GatheredParameters
    block, and the ranks' collectives stop matching.)"""
    from distill.distributed import barrier

    barrier()  # rank 0 has written it
    student = CausalStudent.from_pretrained(folder, torch_dtype=torch.float32,
                                            attention_backend=cfg.model.attention)
    return student.to(env.device).eval()


def student_timesteps(cfg: DictConfig) -> list[float]:
    """The student's denoising timesteps after the shift: the trajectory points ODE pairs keep."""
    from student.sampling import denoising_timesteps

    return denoising_timesteps(list(cfg.student.denoising_steps), cfg.student.shift)
