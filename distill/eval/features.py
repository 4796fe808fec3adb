"""Learned-feature consistency of generated videos (real footage): CLIP- or DINO-style image encoders.

The paper measures consistency with pretrained image features (DINO for subjects, CLIP for
backgrounds, ShotStream §5.1). `FeatureExtractor` loads such an encoder from a local transformers
folder (`eval.features.path`: CLIPVisionModel for kind "clip", Dinov2Model for "dino", each with its
image processor) and embeds frames as its pooled output. From the embeddings of a video:

- `<kind>_intra`: the mean cosine similarity of consecutive frames inside each shot, averaged over shots;
- `<kind>_inter`: the mean cosine similarity between shot embeddings (the normalised mean of a shot's
  normalised frame embeddings) over every pair of shots; absent for one-shot videos.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

KINDS = ("clip", "dino")


class FeatureExtractor:
    """A frozen image encoder + its processor from a local folder; `embed` maps frames to vectors."""

    def __init__(self, kind: str, path: str | os.PathLike, device: str | torch.device = "cpu",
                 batch: int = 32) -> None:
        from transformers import AutoImageProcessor, CLIPVisionModel, Dinov2Model
        from transformers.utils import logging as transformers_logging

        if kind not in KINDS:
            raise ValueError(f"eval.features.kind: {kind!r} is not one of none, {', '.join(KINDS)}")
        if not Path(path, "config.json").is_file():
            raise FileNotFoundError(f"eval.features.path: {path} holds no transformers model (config.json)")
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()  # the PIL-backend fallback notice is not ours to print
        try:
            self.processor = AutoImageProcessor.from_pretrained(str(path))
        finally:
            transformers_logging.set_verbosity(verbosity)
        model_cls = CLIPVisionModel if kind == "clip" else Dinov2Model
        self.model = model_cls.from_pretrained(str(path)).to(device).eval()
        self.kind, self.device, self.batch = kind, torch.device(device), batch

    @torch.no_grad()
    def embed(self, frames: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings [F, D] of uint8 frames [F, H, W, 3]."""
        out = []
        for a in range(0, frames.shape[0], self.batch):
            images = [f.numpy() for f in frames[a:a + self.batch].cpu()]
            pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
            pooled = self.model(pixel_values=pixels.to(self.device, self.model.dtype)).pooler_output
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
        return torch.cat(out)


def feature_consistency(embeddings: torch.Tensor, shot_lengths: list[int], kind: str) -> dict[str, float]:
    """`<kind>_intra` and (two shots or more) `<kind>_inter` of unit-norm frame embeddings [F, D]."""
    if sum(shot_lengths) != embeddings.shape[0]:
        raise ValueError(f"shot lengths {shot_lengths} do not cover the {embeddings.shape[0]} embedded frames")
    shots = list(torch.split(embeddings, shot_lengths))
    intra = [float((s[1:] * s[:-1]).sum(-1).mean()) if len(s) > 1 else 1.0 for s in shots]
    out = {f"{kind}_intra": sum(intra) / len(intra)}
    if len(shots) > 1:
        centres = torch.nn.functional.normalize(torch.stack([s.mean(0) for s in shots]), dim=-1)
        sim = centres @ centres.T
        pairs = torch.triu_indices(len(shots), len(shots), offset=1)
        out[f"{kind}_inter"] = float(sim[pairs[0], pairs[1]].mean())
    return out
