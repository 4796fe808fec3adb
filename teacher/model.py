"""NextShotTeacher: a Wan2.1 transformer that predicts the next shot's velocity from clean context frames.

Context injection (ShotStream §4.1, Table 3):
- frame_concat (default): clean context latents [B, C, Fc, H, W] ⊕ noisy target [B, C, F, H, W]
  along time; context tokens run at t = 0, the target at the given timestep; only the target
  frames are returned (so noise and loss touch target tokens only).
- channel_concat (ablation): context frames are aligned to the target's F frames by nearest index
  (target frame f takes context frame floor(f·Fc/F)) and stacked on the channel axis. The patch
  embedding is widened to 2C input channels with the new ones zero-initialised, so the widened model
  starts as the base model; its weights are then trainable (they are the only way context enters).
  There are no context tokens, so every token uses the target's text.

Captions: "multi" — each context frame cross-attends to its own shot's text (`context_text`),
target frames to `text`; "target_only" — every frame uses `text`.
Context timestep: "zero" — the clean context tokens run at t = 0; "target" — at the target's
timestep (the official ShotStream teacher's convention; the context stays clean either way).
Training may noise the context (FilmWeaver's asymmetric noise, distill/context_noise.py): then
`context_timesteps` [B, Fc] gives each context frame the timestep it was noised at, in place of either
convention (frame_concat only: channel_concat has no context tokens to carry a timestep).
Positions: "shot_rope" — frame t of shot k turns every temporal RoPE band by the phase k·θ on top
of its angle at t (teacher/rope.py); "sequential" — t alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from teacher.backbone import TextKV, WanBackbone
from teacher.files import atomic_folder
from teacher.rope import shot_positions

SETTINGS_FILE = "shotdistill_teacher.json"
CHOICES = {
    "injection": ("frame_concat", "channel_concat"),
    "captions": ("multi", "target_only"),
    "positions": ("shot_rope", "sequential"),
    "trainable": ("self_attention", "all"),
    "context_timestep": ("zero", "target"),
}
DEFAULTS = {"injection": "frame_concat", "captions": "multi", "positions": "shot_rope",
            "theta": 1.0 / 6.0, "trainable": "self_attention", "context_timestep": "zero"}


class NextShotTeacher(nn.Module):
    """Bidirectional next-shot teacher over a diffusers `WanTransformer3DModel` (`self.transformer`)."""

    def __init__(self, transformer: nn.Module, injection: str = "frame_concat", captions: str = "multi",
                 positions: str = "shot_rope", theta: float = 1.0 / 6.0,
                 trainable: str = "self_attention", context_timestep: str = "zero") -> None:
        super().__init__()
        for key, value in (("injection", injection), ("captions", captions), ("positions", positions),
                           ("trainable", trainable), ("context_timestep", context_timestep)):
            if value not in CHOICES[key]:
                raise ValueError(f"teacher {key} must be one of {list(CHOICES[key])}; got {value!r}")
        self.injection, self.captions, self.positions = injection, captions, positions
        self.theta, self.trainable, self.context_timestep = float(theta), trainable, context_timestep
        self.transformer = transformer
        self.latent_channels = transformer.config.out_channels or transformer.config.in_channels
        self._fit_patch_embedding()
        self.backbone = WanBackbone(transformer)  # a plain object: the weights stay the transformer's

    # ---- construction -------------------------------------------------------------------
    def _fit_patch_embedding(self) -> None:
        """Widen the patch embedding for channel_concat (zero new channels); refuse mismatched folders."""
        c_in, c = self.transformer.config.in_channels, self.latent_channels
        wanted = 2 * c if self.injection == "channel_concat" else c
        if c_in == wanted:
            return
        if not (self.injection == "channel_concat" and c_in == c):
            raise ValueError(f"transformer in_channels {c_in} does not fit injection {self.injection!r} "
                             f"with {c} latent channels (expected {wanted})")
        old = self.transformer.patch_embedding
        new = nn.Conv3d(2 * c, old.out_channels, old.kernel_size, old.stride,
                        device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight.zero_()
            new.weight[:, :c].copy_(old.weight)
            new.bias.copy_(old.bias)
        self.transformer.patch_embedding = new
        self.transformer.register_to_config(in_channels=2 * c)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, torch_dtype: torch.dtype | None = None,
                        **settings) -> "NextShotTeacher":
        """Load a diffusers transformer folder (or a pipeline folder with transformer/); settings
        saved by `save_pretrained` are the defaults, keyword arguments override them."""
        from diffusers import WanTransformer3DModel

        path = Path(folder)
        if not (path / "config.json").is_file() and (path / "transformer" / "config.json").is_file():
            path = path / "transformer"
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: no diffusers transformer here (missing config.json)")
        chosen = dict(DEFAULTS)
        if (path / SETTINGS_FILE).is_file():
            chosen.update(json.loads((path / SETTINGS_FILE).read_text()))
        unknown = sorted(set(settings) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"unknown teacher settings {unknown}; valid: {sorted(DEFAULTS)}")
        chosen.update({k: v for k, v in settings.items() if v is not None})
        kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
        return cls(WanTransformer3DModel.from_pretrained(str(path), **kwargs), **chosen)

    def settings(self) -> dict:
        """Our own settings (saved next to the diffusers config)."""
        return {"injection": self.injection, "captions": self.captions, "positions": self.positions,
                "theta": self.theta, "trainable": self.trainable, "context_timestep": self.context_timestep}

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write the diffusers folder plus our settings json; the folder appears complete or not at all."""
        with atomic_folder(folder) as tmp:
            self.transformer.save_pretrained(str(tmp))
            (tmp / SETTINGS_FILE).write_text(json.dumps(self.settings(), indent=2) + "\n")

    # ---- training switches -----------------------------------------------------------------
    def external_parameters(self) -> list[nn.Parameter]:
        """Parameters used outside their owning module's forward (see WanBackbone.direct_parameters)."""
        return self.backbone.direct_parameters()

    def set_trainable(self) -> list[str]:
        """Set requires_grad per `trainable` and return the trainable parameter names.

        self_attention: the blocks' attn1 (q/k/v/out projections and q/k norms) — plus the widened
        patch embedding under channel_concat, the only path for the context there."""
        names = []
        for name, param in self.named_parameters():
            train = self.trainable == "all" or ".attn1." in name or (
                self.injection == "channel_concat" and name.startswith("transformer.patch_embedding."))
            param.requires_grad_(train)
            if train:
                names.append(name)
        return names

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in backward (torch.utils.checkpoint, use_reentrant=False)."""
        self.backbone.gradient_checkpointing = enabled

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, noisy: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                context: torch.Tensor | None = None, context_text: torch.Tensor | None = None,
                context_shots: torch.Tensor | None = None,
                context_timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity for the target frames, shaped like `noisy` [B, C, F, H, W].

        timestep [B] (or [B, F] per target frame) in [0, 1000]; text [B, L, D] the target shot's
        text; context [B, C, Fc, H, W] clean latents; context_text [B, Fc, L, D] each context frame's
        own shot text; context_shots [B, Fc] or [Fc] shot index of each context frame (0 = oldest);
        context_timesteps [B, Fc] the timestep each context frame was noised at (None: clean, the
        `context_timestep` convention).
        Without context_shots, a context frame starts a new shot where its text differs from the
        previous frame's (one shot when there is no context_text). The target is the next shot.
        """
        self._check_inputs(noisy, timestep, text, context, context_text)
        if context_timesteps is not None and (context is None or self.injection != "frame_concat"
                                              or tuple(context_timesteps.shape) != (context.shape[0], context.shape[2])):
            got = None if context is None else list(context.shape)
            raise ValueError(f"context_timesteps {list(context_timesteps.shape)} needs frame_concat injection and "
                             f"must be [B, Fc] for context {got}")
        if self.injection == "channel_concat":
            return self._forward_channel_concat(noisy, timestep, text, context, context_shots)
        frames = noisy.shape[2]
        shots = self._frame_shots(noisy, context, context_text, context_shots)
        positions, phases = shot_positions(shots, self.theta if self.positions == "shot_rope" else 0.0)
        if context is None:
            latents, timesteps = noisy, timestep
        else:
            latents = torch.cat([context.to(noisy.dtype), noisy], dim=2)
            if timestep.ndim == 1:
                timestep = timestep.unsqueeze(1).expand(-1, frames)
            if context_timesteps is None:
                context_timesteps = self._context_timesteps(timestep, context.shape[2])
            timesteps = torch.cat([context_timesteps.to(timestep.device, timestep.dtype), timestep], dim=1)
        text_kv, frame_text = self._text(text, context, context_text, frames)
        return self.backbone(latents, timesteps, positions, text_kv, frame_text, out_frames=frames, phases=phases)

    def _context_timesteps(self, timestep: torch.Tensor, frames: int) -> torch.Tensor:
        """[B, Fc]: the clean context's timestep, 0 ("zero") or the target's first frame's ("target", as
        the official teacher was trained)."""
        if self.context_timestep == "zero":
            return timestep.new_zeros(timestep.shape[0], frames)
        return timestep[:, :1].expand(-1, frames)

    def _check_inputs(self, noisy, timestep, text, context, context_text) -> None:
        """Shape checks whose messages name the offending tensors and what the model expects."""
        if noisy.ndim != 5 or noisy.shape[1] != self.latent_channels:
            channels = noisy.shape[1] if noisy.ndim > 1 else "?"
            raise ValueError(f"latents have {channels} channels but the model expects {self.latent_channels} "
                             f"(out_channels); got noisy {list(noisy.shape)}")
        if self.injection == "frame_concat":
            self.backbone.check_latents("noisy", noisy)
        batch = noisy.shape[0]
        if timestep.ndim not in (1, 2) or timestep.shape[0] != batch or (
                timestep.ndim == 2 and timestep.shape[1] != noisy.shape[2]):
            raise ValueError(f"timestep {list(timestep.shape)} must be [B] or [B, F] for noisy {list(noisy.shape)}")
        if text.ndim != 3 or text.shape[0] != batch:
            raise ValueError(f"text {list(text.shape)} must be [B, L, D] for noisy {list(noisy.shape)}")
        if context is not None:
            if context.ndim != 5 or context.shape[:2] != noisy.shape[:2] or context.shape[3:] != noisy.shape[3:]:
                raise ValueError(f"context {list(context.shape)} must share batch, channels, height and width "
                                 f"with noisy {list(noisy.shape)}")
            if self.injection == "frame_concat":
                self.backbone.check_latents("context", context)
        if context_text is not None and (
                context is None or context_text.ndim != 4 or context_text.shape[2:] != text.shape[1:]
                or (context_text.shape[0], context_text.shape[1]) != (context.shape[0], context.shape[2])):
            got = None if context is None else list(context.shape)
            raise ValueError(f"context_text {list(context_text.shape)} must be [B, Fc, L, D] for context "
                             f"{got} and text {list(text.shape)}")

    @staticmethod
    def _frame_shots(noisy: torch.Tensor, context: torch.Tensor | None, context_text: torch.Tensor | None,
                     context_shots: torch.Tensor | None) -> torch.Tensor:
        """Shot index of every frame [B, Fc + F]: the context's shots, then the target as the next shot."""
        batch, frames = noisy.shape[0], noisy.shape[2]
        if context is None:
            return torch.zeros(1, frames, dtype=torch.long, device=noisy.device)
        if context_shots is not None:
            if context_shots.ndim not in (1, 2) or context_shots.shape[-1] != context.shape[2]:
                raise ValueError(f"context_shots {list(context_shots.shape)} must be [Fc] or [B, Fc] for "
                                 f"context {list(context.shape)}")
            shots = context_shots.to(noisy.device, torch.long).expand(batch, context.shape[2])
        elif context_text is not None:
            changed = (context_text[:, 1:] != context_text[:, :-1]).flatten(2).any(-1)
            shots = torch.cat([changed.new_zeros(batch, 1), changed], dim=1).long().cumsum(1)
            shots = shots.to(noisy.device)
        else:
            shots = torch.zeros(batch, context.shape[2], dtype=torch.long, device=noisy.device)
        target = shots.max(dim=1, keepdim=True).values + 1
        return torch.cat([shots, target.expand(batch, frames)], dim=1)

    def _text(self, text: torch.Tensor, context: torch.Tensor | None, context_text: torch.Tensor | None,
              frames: int) -> tuple[TextKV, torch.Tensor | None]:
        """Cross-attention K/V of the distinct texts and each frame's text index (None: one text)."""
        if context is None or self.captions == "target_only":
            return self.backbone.text_kv(text), None
        if context_text is None:
            raise ValueError("captions 'multi' needs context_text [B, Fc, L, D] when context is given")
        return self.backbone.frame_text_kv(text, context_text, frames)

    def _forward_channel_concat(self, noisy: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                                context: torch.Tensor | None, context_shots: torch.Tensor | None) -> torch.Tensor:
        """Channel concat: context aligned to the target frames by nearest index (zeros when absent)."""
        frames = noisy.shape[2]
        if context is None:
            aligned = torch.zeros_like(noisy)
            target_shot = 0
        else:
            index = torch.div(torch.arange(frames, device=noisy.device) * context.shape[2], frames,
                              rounding_mode="floor")
            aligned = context.to(noisy.dtype).index_select(2, index)
            target_shot = 1 if context_shots is None else int(context_shots.max()) + 1
        latents = torch.cat([noisy, aligned], dim=1)
        self.backbone.check_latents("noisy ⊕ context", latents)
        shot = torch.full((frames,), target_shot, device=noisy.device)
        positions, phases = shot_positions(shot, self.theta if self.positions == "shot_rope" else 0.0)
        return self.backbone(latents, timestep, positions, self.backbone.text_kv(text), phases=phases)
