"""Recipe → the Wan transformer and the next-shot teacher (teacher, ODE, causal-init and DMD stages).

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

from teacher.model import NextShotTeacher


def _json(folder: Path, what: str) -> dict:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} config not found") from None


def _component(root: str, name: str) -> Path:
    """A component folder of a diffusers root (`root/name`), or `root` itself when it is one."""
    path = Path(root)
    if not path.is_dir():
        raise FileNotFoundError(f"{root}: model folder not found")
    return path / name if (path / name).is_dir() else path


def latent_channels(codec: DictConfig) -> int:
    """Channels of the codec's latents: 3·patch² for PatchCodec, the VAE's z_dim for Wan."""
    if codec.kind == "patch":
        return 3 * codec.patch * codec.patch
    if not codec.path:
        raise ValueError("codec.path: the Wan VAE folder is required when codec.kind is 'wan'")
    return int(_json(_component(codec.path, "vae"), "codec.path VAE")["z_dim"])


def text_dim(text: DictConfig) -> int:
    """Width of the text encoder's embeddings (the transformer's text_dim)."""
    if text.kind == "tiny_t5":
        return int(text.dim)
    if not text.path:
        raise ValueError("text_encoder.path: the UMT5 folder is required when text_encoder.kind is 'umt5'")
    return int(_json(_component(text.path, "text_encoder"), "text_encoder.path UMT5")["d_model"])


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
    folder = _component(cfg.model.path, "transformer")
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
                trainable=t.trainable)


def build_teacher(cfg: DictConfig) -> NextShotTeacher:
    """A fresh next-shot teacher around the recipe's Wan (the teacher stage's starting point)."""
    return NextShotTeacher(build_wan(cfg), **teacher_settings(cfg))


def load_teacher(folder: str | Path) -> NextShotTeacher:
    """A trained teacher saved by the teacher stage (`<teacher stage>/model`), with its own settings."""
    return NextShotTeacher.from_pretrained(folder, torch_dtype=torch.float32)
