"""CausalStudent: the next-shot teacher's Wan transformer run chunk-causally (ShotStream §4.2).

Same weights and the same conditioning as `NextShotTeacher` (frame concat: clean context frames at
t = 0 before the target, per-frame captions, shot positions), with two differences: the target's
latent frames form chunks of `chunk_frames`, and attention is chunk-causal (the context prefix is
visible to every chunk; chunk i sees chunks i - window + 1 .. i, window = local_chunks + 1 so that
training sees exactly what the KV cache holds at inference, see student/cache.py; with
`local_compression` the past chunks are seen pooled by age, as the compressed cache holds them,
student/compression.py).

Shot boundary indicator (`indicator`, ShotStream Table 4):
- rope_offset: every temporal RoPE band of frame t of shot k turns by the phase k·θ (the teacher's
  "shot_rope", teacher/rope.py);
- learnable: positions t, and a learned vector (zero-initialised, so the student starts as the
  teacher) added to the tokens of the target shot's first chunk when the shot follows a cut, i.e.
  when there is context — the first shot of a stream has no boundary to mark;
- none: positions t and nothing else (the teacher's "sequential").
"""

from __future__ import annotations

import os
from functools import partial

import torch
from diffusers import WanTransformer3DModel
from torch import nn

from kernels import chunk_causal_attention
from teacher.backbone import Attention, KVProvider, TextKV, WanBackbone
from student.compression import check_grid, compressed_attention
from student.folder import (GENERATOR_FILE, INDICATOR_FILE, TRANSFORMER, TRANSFORMER_CONFIG, read_folder, require,
                            transformer_config, verify_files)
from student.settings import StudentSettings, settings_from_dict
from teacher.encoders import DTYPES
from teacher.rope import shot_positions

_TEACHER_POSITIONS = {"rope_offset": "shot_rope", "learnable": "sequential", "none": "sequential"}


class CausalWanTransformer3DModel(WanTransformer3DModel):
    """A Wan transformer saved inside a student folder: diffusers' own model and loading (bf16 keeps
    its norms and embedders in float32), reading its config from causal_config.json. The name is
    the point: WanTransformer3DModel.from_pretrained finds no config.json there and refuses the folder
    rather than run these weights as a plain bidirectional Wan (student/folder.py)."""

    config_name = TRANSFORMER_CONFIG


class CausalStudent(nn.Module):
    """Chunk-causal next-shot model over a diffusers `WanTransformer3DModel` (`self.transformer`)."""

    def __init__(self, transformer: nn.Module, settings: StudentSettings | None = None,
                 attention_backend: str = "auto") -> None:
        super().__init__()
        self.settings = (settings or StudentSettings()).check()
        self.transformer = transformer
        self.backbone = WanBackbone(transformer)
        self.latent_channels = self.backbone.out_channels
        if self.backbone.in_channels != self.latent_channels:
            raise ValueError(f"the causal student needs frame concat: transformer in_channels "
                             f"{self.backbone.in_channels} differ from out_channels {self.latent_channels}")
        if self.settings.chunk_frames % self.backbone.patch_size[0]:
            raise ValueError(f"chunk_frames {self.settings.chunk_frames} is not a multiple of the temporal "
                             f"patch size {self.backbone.patch_size[0]}")
        self.attention_backend = attention_backend
        dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        param = next(transformer.parameters())
        self.shot_indicator = nn.Parameter(torch.zeros(dim, dtype=param.dtype, device=param.device)) \
            if self.settings.indicator == "learnable" else None

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_teacher(cls, teacher: nn.Module, chunk_frames: int = 3, copy: bool = True,
                     **settings) -> "CausalStudent":
        """A student with the teacher's weights (a deep copy unless copy=False) and conditioning."""
        import copy as copying

        if teacher.injection != "frame_concat":
            raise ValueError(f"the causal student needs a frame_concat teacher; got injection {teacher.injection!r}")
        indicator = settings.pop("indicator", None) or (
            "rope_offset" if teacher.positions == "shot_rope" else "none")
        if _TEACHER_POSITIONS.get(indicator, teacher.positions) != teacher.positions:
            raise ValueError(f"student indicator {indicator!r} needs teacher positions "
                             f"{_TEACHER_POSITIONS[indicator]!r}; the teacher uses {teacher.positions!r}")
        chosen = StudentSettings(chunk_frames=chunk_frames, indicator=indicator, theta=teacher.theta,
                                 captions=teacher.captions, **settings)
        transformer = copying.deepcopy(teacher.transformer) if copy else teacher.transformer
        return cls(transformer, chosen)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, torch_dtype: torch.dtype | None = None,
                        attention_backend: str = "auto") -> "CausalStudent":
        """The one loader: a student folder (a stage's `student/` or a serving export, see
        student/folder.py); a missing file is named in a one-line error. torch_dtype None loads the
        weights in the dtype they were saved in. Never imports DeepSpeed."""
        info = read_folder(folder)
        root = info.folder
        config = transformer_config(root)
        if not list((root / TRANSFORMER).glob("*.safetensors")):
            raise FileNotFoundError(f"{root}: student folder is missing {TRANSFORMER}/*.safetensors")
        settings = settings_from_dict(info.settings, root / GENERATOR_FILE)
        # what this loads, against the sizes and sha256 generator.json records (a corrupted byte
        # would otherwise load as weights)
        verify_files(info, lambda rel: rel.startswith(f"{TRANSFORMER}/") or rel == INDICATOR_FILE)
        torch_dtype = torch_dtype or DTYPES.get(info.dtype or "float32")
        if torch_dtype is None:
            raise ValueError(f"{root / GENERATOR_FILE}: unknown dtype {info.dtype!r}; expected one of {sorted(DTYPES)}")
        model = CausalWanTransformer3DModel if config.name == TRANSFORMER_CONFIG else WanTransformer3DModel
        transformer = model.from_pretrained(str(root / TRANSFORMER), torch_dtype=torch_dtype)
        student = cls(transformer, settings, attention_backend=attention_backend)
        if student.shot_indicator is not None:
            from safetensors.torch import load_file

            saved = load_file(str(require(root, INDICATOR_FILE)))["shot_indicator"]
            with torch.no_grad():
                student.shot_indicator.copy_(saved.to(student.shot_indicator.dtype))
        return student.eval()

    @property
    def dtype(self) -> torch.dtype:
        """The transformer's compute dtype (what diffusers' pipelines ask their models)."""
        return self.transformer.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in backward (the KV cache's keep_graph mode supports it)."""
        self.backbone.gradient_checkpointing = enabled

    # ---- shared pieces ------------------------------------------------------------------------
    def check_frames(self, name: str, latents: torch.Tensor) -> None:
        """Target latents must be [B, C, F, H, W] with F a whole number of chunks."""
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"{name} {list(latents.shape)} must be [B, {self.latent_channels}, F, H, W] latents")
        frames, chunk = latents.shape[2], self.settings.chunk_frames
        if frames % chunk or frames == 0:
            raise ValueError(f"{name} has {frames} latent frames, not a whole number of {chunk}-frame chunks "
                             f"(chunk_frames)")

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """The token grid (rows, columns) of a latent frame of a [.., height, width] latent."""
        _, ph, pw = self.backbone.patch_size
        return height // ph, width // pw

    def frame_tokens(self, height: int, width: int) -> int:
        """Tokens per latent frame of a [.., height, width] latent."""
        rows, columns = self.token_grid(height, width)
        return rows * columns

    def text_conditioning(self, text: torch.Tensor, context_text: torch.Tensor | None, context_frames: int,
                          target_frames: int) -> tuple[TextKV, torch.Tensor | None]:
        """Cross-attention K/V of the distinct texts and each frame's text index, as the teacher does:
        context frames attend to their own shot's text ("multi"), target frames to `text`."""
        if context_frames == 0 or self.settings.captions == "target_only":
            return self.backbone.text_kv(text), None
        if context_text is None:
            raise ValueError("captions 'multi' needs context_text [B, Fc, L, D] when context is given")
        return self.backbone.frame_text_kv(text, context_text, target_frames)

    @staticmethod
    def context_shot_index(batch: int, context_frames: int, context_text: torch.Tensor | None,
                           context_shots: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """Shot index of every context frame [B, Fc] (explicit, or a new shot where the text changes)."""
        if context_shots is not None:
            if context_shots.ndim not in (1, 2) or context_shots.shape[-1] != context_frames:
                raise ValueError(f"context_shots {list(context_shots.shape)} must be [Fc] or [B, Fc] with "
                                 f"Fc = {context_frames}")
            return context_shots.to(device, torch.long).expand(batch, context_frames)
        if context_text is not None:
            changed = (context_text[:, 1:] != context_text[:, :-1]).flatten(2).any(-1)
            return torch.cat([changed.new_zeros(batch, 1), changed], dim=1).long().cumsum(1).to(device)
        return torch.zeros(batch, context_frames, dtype=torch.long, device=device)

    def run(self, latents: torch.Tensor, timesteps: torch.Tensor, positions: torch.Tensor, text: TextKV,
            frame_text: torch.Tensor | None, attn: Attention, kv: KVProvider | None = None,
            marked: tuple[int, int] | None = None, out_frames: int = 0,
            phases: torch.Tensor | None = None) -> torch.Tensor | None:
        """One pass over latents [B, C, F, H, W] (timesteps [B, F], positions and shot phases [F] or
        [B, F]); the
        indicator is added to the latent frames [marked[0], marked[1]); returns the velocity of the
        last `out_frames` frames (None for 0: a pass that only fills the cache)."""
        backbone = self.backbone
        grid = backbone.check_latents("latents", latents)
        tokens = backbone.embed(latents)
        if marked is not None and self.shot_indicator is not None:
            a, b = (m // backbone.patch_size[0] * grid.per_frame for m in marked)
            tokens = torch.cat([tokens[:, :a], tokens[:, a:b] + self.shot_indicator.to(tokens.dtype),
                                tokens[:, b:]], dim=1)
        cond = backbone.conditioning(timesteps, positions, grid, tokens.dtype, phases)
        tokens = backbone.run_blocks(tokens, grid, cond, text, frame_text, attn, kv)
        if out_frames == 0:
            return None
        keep = out_frames // backbone.patch_size[0]
        return backbone.head(tokens[:, -keep * grid.per_frame:], cond.temb[:, -keep:], grid.tail(keep))

    # ---- full-sequence forward (training) -------------------------------------------------------
    def forward(self, noisy: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                context: torch.Tensor | None = None, context_text: torch.Tensor | None = None,
                context_shots: torch.Tensor | None = None, window_chunks: int | None | str = "cache"
                ) -> torch.Tensor:
        """Velocity of the target frames [B, C, F, H, W] under chunk-causal attention.

        timestep [B] or [B, F] in [0, 1000] (per frame: each chunk its own noise level); text, context,
        context_text, context_shots as `NextShotTeacher.forward`. window_chunks: "cache" (default)
        uses `local_chunks + 1` (or the compressed local memory), what the KV cache reproduces; None means
        no window.
        """
        self.check_frames("noisy", noisy)
        batch, frames = noisy.shape[0], noisy.shape[2]
        if timestep.ndim not in (1, 2) or timestep.shape[0] != batch or (
                timestep.ndim == 2 and timestep.shape[1] != frames):
            raise ValueError(f"timestep {list(timestep.shape)} must be [B] or [B, F] for noisy {list(noisy.shape)}")
        timesteps = timestep.unsqueeze(1).expand(batch, frames) if timestep.ndim == 1 else timestep
        fc = 0 if context is None else context.shape[2]
        if context is not None:
            self.backbone.check_latents("context", context)
            if context.shape[:2] != noisy.shape[:2] or context.shape[3:] != noisy.shape[3:]:
                raise ValueError(f"context {list(context.shape)} must share batch, channels, height and width "
                                 f"with noisy {list(noisy.shape)}")
            noisy = torch.cat([context.to(noisy.dtype), noisy], dim=2)
            timesteps = torch.cat([timesteps.new_zeros(batch, fc), timesteps], dim=1)
        shots = self.context_shot_index(batch, fc, context_text, context_shots, noisy.device)
        target = (shots.max(dim=1, keepdim=True).values + 1) if fc else shots.new_zeros(batch, 1)
        positions, phases = shot_positions(torch.cat([shots, target.expand(batch, frames)], dim=1),
                                           self.settings.position_theta)
        text_kv, frame_text = self.text_conditioning(text, context_text, fc, frames)
        window = self.settings.window_chunks if window_chunks == "cache" else window_chunks
        grid = self.token_grid(noisy.shape[3], noisy.shape[4])
        pt = self.backbone.patch_size[0]
        geometry = dict(prefix_len=fc // pt * grid[0] * grid[1],
                        chunk_len=self.settings.chunk_frames // pt * grid[0] * grid[1])
        kernels = self.settings.local_compression
        if kernels and window_chunks == "cache":  # what the compressed local cache holds (student/compression.py)
            check_grid(kernels, grid)
            attn = partial(compressed_attention, grid=grid, kernels=kernels, **geometry)
        else:
            attn = partial(chunk_causal_attention, window_chunks=window, backend=self.attention_backend, **geometry)
        marked = (fc, fc + self.settings.chunk_frames) if fc else None
        return self.run(noisy, timesteps, positions, text_kv, frame_text, attn, marked=marked, out_frames=frames,
                        phases=phases)

    # ---- training helpers ---------------------------------------------------------------------
    def external_parameters(self) -> list[nn.Parameter]:
        """Parameters used outside their owning module's forward: the backbone's modulation tables
        and the learnable shot indicator (ZeRO-3 must gather them for the whole pass)."""
        extra = [] if self.shot_indicator is None else [self.shot_indicator]
        return self.backbone.direct_parameters() + extra
