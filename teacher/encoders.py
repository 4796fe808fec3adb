"""Codecs (pixels ⇄ latents) and text encoders (captions → token embeddings), for training and serving.

Pixels are float tensors [B, 3, F, H, W] in [-1, 1]; latents are [B, C, F', H', W'] with
F' = codec.latent_frames(F) and H' = H / spatial_factor. Two codecs share the interface:

- `WanVAECodec`: diffusers `AutoencoderKLWan` loaded from a local folder; latents are the posterior
  mean normalised per channel with the VAE config's `latents_mean`/`latents_std`, as Wan does.
  Its temporal factor is 4 (1 + 4k frames → 1 + k latents), so a single frame is one latent frame.
- `PatchCodec`: lossless space-to-depth, no weights, temporal factor 1 (the synthetic world).

Text: `T5TextEncoder` wraps a `transformers` UMT5 encoder and a fast tokenizer from a local folder
(Wan's UMT5-XXL, or a tiny random one with a word-level tokenizer built by `build_tiny_t5`).
`encode` returns each caption's real tokens only ([n_i, D], EOS included); `join_text` concatenates
several captions' tokens and zero-pads to a fixed length, which is how Wan pads UMT5 output (the
padding positions are zeros, not the encoder's outputs at pad tokens).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence

import torch

from teacher.context import CAPTION_LAYOUTS, joint_caption
from teacher.files import atomic_folder

# Recipe/export dtype names -> torch dtypes (codecs, text encoders, shards, students).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------- pixels


def pixels_from_uint8(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames [F, H, W, 3] → float pixels [3, F, H, W] in [-1, 1]."""
    return frames.permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


def pixels_to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """float pixels [3, F, H, W] in [-1, 1] → uint8 frames [F, H, W, 3] (rounded, clamped)."""
    return pixels.float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0)


# --------------------------------------------------------------------------- codecs


class Codec(ABC):
    """Pixels [B, 3, F, H, W] in [-1, 1] ⇄ latents [B, channels, F', H / s, W / s]."""

    channels: int
    temporal_factor: int
    spatial_factor: int

    @abstractmethod
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        ...

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        ...

    def latent_frames(self, pixel_frames: int) -> int:
        """Latent frames of a clip; the clip must have 1 + k·temporal_factor frames (any with factor 1)."""
        if not self.frames_aligned(pixel_frames):
            raise ValueError(f"{pixel_frames} frames do not fit the codec: expected 1 + k*{self.temporal_factor}")
        return 1 + (pixel_frames - 1) // self.temporal_factor

    def frames_aligned(self, pixel_frames: int) -> bool:
        return pixel_frames >= 1 and (pixel_frames - 1) % self.temporal_factor == 0

    def whole_chunks(self, pixel_frames: int, chunk: int) -> int:
        """The most pixel frames, at most `pixel_frames`, whose latents are a whole number of `chunk`-frame
        chunks (0: not even one chunk fits)."""
        latents = (1 + (pixel_frames - 1) // self.temporal_factor) // chunk * chunk if pixel_frames >= 1 else 0
        return 0 if latents == 0 else 1 + (latents - 1) * self.temporal_factor

    @property
    def frames_are_latents(self) -> bool:
        """True when pixel frame f is latent frame f, so single context frames need no own encoding."""
        return self.temporal_factor == 1

    def encode_frames(self, pixels: torch.Tensor) -> torch.Tensor:
        """Each frame of [B, 3, F, H, W] encoded on its own, as an image → latents [B, C, F, h, w]."""
        b = pixels.shape[0]
        singles = pixels.permute(0, 2, 1, 3, 4).flatten(0, 1).unsqueeze(2)  # [B·F, 3, 1, H, W]
        lat = self.encode(singles)
        return lat.squeeze(2).unflatten(0, (b, -1)).permute(0, 2, 1, 3, 4)


class PatchCodec(Codec):
    """Lossless space-to-depth: each p×p pixel patch becomes 3·p² channels of one latent pixel,
    normalised as (pixel - mean) / std so latents meet the unit-variance noise of flow matching on
    equal terms (Wan's VAE carries per-channel statistics for the same reason)."""

    def __init__(self, patch: int, mean: float = 0.0, std: float = 1.0) -> None:
        if patch < 1 or not std > 0:
            raise ValueError(f"codec patch must be >= 1 and std > 0, got patch {patch}, std {std}")
        self.patch, self.mean, self.std = patch, float(mean), float(std)
        self.channels = 3 * patch * patch
        self.temporal_factor = 1
        self.spatial_factor = patch

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = pixels.shape
        p = self.patch
        if h % p or w % p:
            raise ValueError(f"frame size {h}x{w} is not divisible by the codec patch {p}")
        x = ((pixels - self.mean) / self.std).reshape(b, c, f, h // p, p, w // p, p)
        return x.permute(0, 1, 4, 6, 2, 3, 5).reshape(b, c * p * p, f, h // p, w // p)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        b, cpp, f, h, w = latents.shape
        p = self.patch
        x = latents.reshape(b, cpp // (p * p), p, p, f, h, w)
        return x.permute(0, 1, 4, 5, 2, 6, 3).reshape(b, cpp // (p * p), f, h * p, w * p) * self.std + self.mean


def component_folder(path: str | os.PathLike, name: str) -> Path:
    """A diffusers pipeline root holds components in subfolders (`vae/`, `text_encoder/`, ...): the
    subfolder `name` of `path`, or `path` itself when it is the component folder."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: model folder not found")
    return path / name if (path / name).is_dir() else path


class WanVAECodec(Codec):
    """Wan2.1's causal 3D VAE; latents normalised per channel the way Wan's pipelines do."""

    def __init__(self, vae: torch.nn.Module) -> None:
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.channels = cfg.z_dim
        self.temporal_factor = 2 ** sum(cfg.temperal_downsample)
        self.spatial_factor = 2 ** len(cfg.temperal_downsample)
        self._mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
        self._std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> "WanVAECodec":
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan.from_pretrained(component_folder(path, "vae"), torch_dtype=dtype)
        return cls(vae.to(device))

    def _param(self) -> torch.Tensor:
        return next(self.vae.parameters())

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        p = self._param()
        mu = self.vae.encode(pixels.to(p.device, p.dtype)).latent_dist.mode()
        return (mu.float() - self._mean.to(mu.device)) / self._std.to(mu.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        p = self._param()
        z = latents.float() * self._std.to(latents.device) + self._mean.to(latents.device)
        return self.vae.decode(z.to(p.device, p.dtype)).sample.float().clamp(-1.0, 1.0)


# --------------------------------------------------------------------------- text


SPECIALS = ("[PAD]", "[UNK]", "[EOS]")


class T5TextEncoder:
    """A frozen (U)MT5 encoder + fast tokenizer: captions → each caption's real-token embeddings."""

    def __init__(self, model: torch.nn.Module, tokenizer, max_tokens: int) -> None:
        if max_tokens < 1:
            raise ValueError(f"text max_tokens must be >= 1, got {max_tokens}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.dim = model.config.d_model

    @classmethod
    def from_pretrained(cls, path: str | Path, max_tokens: int, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> "T5TextEncoder":
        """Load `text_encoder/` and `tokenizer/` of a Wan pipeline root (or a folder holding both)."""
        from transformers import AutoTokenizer, UMT5EncoderModel

        model = UMT5EncoderModel.from_pretrained(component_folder(path, "text_encoder"), torch_dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(component_folder(path, "tokenizer"))
        return cls(model.to(device), tokenizer, max_tokens)

    def save_pretrained(self, path: str | Path) -> None:
        """Write `text_encoder/` and `tokenizer/` into the folder `path` (beside whatever it holds, as in a
        Wan root); each part appears complete or not at all."""
        for part, obj in (("text_encoder", self.model), ("tokenizer", self.tokenizer)):
            with atomic_folder(Path(path) / part) as tmp:
                obj.save_pretrained(tmp)

    @torch.no_grad()
    def encode(self, captions: Sequence[str], max_tokens: int | None = None) -> list[torch.Tensor]:
        """Per caption, the encoder outputs at its real tokens [n_i, D] (float32, on the CPU), at most
        `max_tokens` (default: the encoder's) of them."""
        batch = self.tokenizer(list(captions), padding="max_length", max_length=max_tokens or self.max_tokens,
                               truncation=True, add_special_tokens=True, return_attention_mask=True,
                               return_tensors="pt")
        device = next(self.model.parameters()).device
        mask = batch.attention_mask.to(device)
        hidden = self.model(input_ids=batch.input_ids.to(device), attention_mask=mask).last_hidden_state
        return [h[:n].float().cpu() for h, n in zip(hidden, mask.sum(dim=1).tolist())]


    def model_text(self, captions: Sequence[str]) -> torch.Tensor:
        """[L, D] on the CPU: the real tokens of each caption in order (global ⊕ shot, the layout every
        model reads; each caption encoded on its own), zero-padded to `text_length(max_tokens)`; no
        caption gives zeros."""
        length = text_length(self.max_tokens)
        if not captions:
            return torch.zeros(length, self.dim)
        return join_text([self.encode([c])[0] for c in captions], length)

    def shot_text(self, global_caption: str, caption: str) -> torch.Tensor:
        """[L, D]: a shot's model text, the global caption ⊕ the shot caption (a blank one adds nothing)."""
        return self.model_text([c for c in (global_caption, caption) if c.strip()])

    def joint_text(self, global_caption: str, captions: Sequence[str]) -> torch.Tensor:
        """[L, D]: the "joint" layout of the official ShotStream teacher: one string, the global caption
        then `shot{i}: caption` of every shot so far, encoded at once (up to L tokens)."""
        length = text_length(self.max_tokens)
        return join_text(self.encode([joint_caption(global_caption, captions)], length), length)

    def prompt_text(self, layout: str, global_caption: str, captions: Sequence[str]) -> torch.Tensor:
        """[L, D]: the model text of the last of `captions` (the shots so far) in `layout`."""
        if layout not in CAPTION_LAYOUTS:
            raise ValueError(f"caption layout must be one of {CAPTION_LAYOUTS}; got {layout!r}")
        if layout == "joint":
            return self.joint_text(global_caption, captions)
        return self.shot_text(global_caption, captions[-1])



def word_tokenizer(vocabulary: Sequence[str], max_tokens: int):
    """A word-level fast tokenizer over `vocabulary` with [PAD]/[UNK]/[EOS]; appends [EOS]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = list(SPECIALS) + sorted(set(vocabulary) - set(SPECIALS))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A [EOS]", special_tokens=[("[EOS]", words.index("[EOS]"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   eos_token="[EOS]", model_max_length=max_tokens)


def vocabulary_of(texts: Sequence[str]) -> list[str]:
    """The words the word-level tokenizer makes of `texts` (its pre-tokenizer split), sorted."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Whitespace()
    return sorted({w for t in texts for w, _ in split.pre_tokenize_str(t)})


def build_tiny_t5(vocabulary: Sequence[str], dim: int, layers: int, heads: int, max_tokens: int,
                  seed: int) -> T5TextEncoder:
    """A random UMT5 encoder of width `dim`, fixed by `seed`, with a word-level tokenizer."""
    from transformers import UMT5Config, UMT5EncoderModel

    if dim % heads:
        raise ValueError(f"text encoder dim {dim} is not divisible by heads {heads}")
    tokenizer = word_tokenizer(vocabulary, max_tokens)
    config = UMT5Config(vocab_size=len(tokenizer), d_model=dim, d_kv=dim // heads, d_ff=2 * dim,
                        num_layers=layers, num_heads=heads, dropout_rate=0.0,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                        decoder_start_token_id=tokenizer.pad_token_id)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = UMT5EncoderModel(config)
    finally:
        torch.random.set_rng_state(state)
    return T5TextEncoder(model, tokenizer, max_tokens)


def join_text(parts: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """Concatenate captions' real tokens [n_i, D] along L and zero-pad to [length, D] (truncating)."""
    if not parts:
        raise ValueError("join_text needs at least one caption")
    tokens = torch.cat(list(parts), dim=0)[:length]
    out = tokens.new_zeros(length, tokens.shape[1])
    out[: tokens.shape[0]] = tokens
    return out


def text_length(max_tokens: int, captions: int = 2) -> int:
    """The model's text length L: `captions` captions (global + shot) of up to max_tokens each."""
    return captions * max_tokens

