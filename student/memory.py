"""Ranked shot memory: retrieved frames (FilmWeaver) and the packed memory (STAGE).

The strategies ``retrieval`` and ``memory_pack`` (teacher/context.py) rank history frames by their
similarity to the new shot's prompt instead of counting frames per shot.

Candidates: ``budget`` evenly spaced frames of every history shot (``candidate_frames``), in time
order, and only the newest ``max_candidates`` of them, so a stream keeps a bounded memory.

Similarity (``similarity``): a scorer turns each candidate into a feature once, when its shot ends,
and scores features against a prompt. ``oracle`` counts the world terms (e.g. colours, shapes,
backgrounds) and named pairs of adjacent terms ("red circle") that the prompt shares with the
caption of the frame's shot: the synthetic world's facts as its captions state them. ``clip`` is the
cosine between a CLIP-style model's text embedding of the prompt and image embedding of the frame.
Ranking: most similar first; equal scores rank the more recent frame first.

``retrieval``: the ``budget`` best-ranked candidates, kept in time order. They carry their shots'
texts and their shots numbered 0, 1, ... in time order (the new shot is the next number), in
training and in the generator alike.

``memory_pack`` with P = ``pack_frames`` latent frames (slots): the ranked candidate j is resized
(area interpolation) to area 1 for j < P - 1, else 1/2^(j - P + 2) of a frame; with P = 2 that is
STAGE's 1/2^j (j = 0 whole, j = 1 half, j = 2 a quarter, ...). Candidates j < P - 1 fill slots
0 .. P - 2 whole. The rest tile the last slot by recursive halving: the free region starts as the
whole slot; each tile takes the first half (top, or left) of the free region along its longer side
(height when equal), and the other half stays free. On an h x w = 4 x 4 latent with P = 2: j = 1 is
rows 0-1, j = 2 rows 2-3 x columns 0-1, j = 3 row 2 x columns 2-3, j = 4 row 3 x column 2; the cell
left over stays zero. Tiling stops when the free region is 1 x 1: the least similar candidates
beyond it are left out (the image resolution bounds the memory, never the history length). Only
slots holding a tile are returned (a short history gives fewer than P). Positions: the slots are
context frames 0 .. n - 1 in slot order, all of one memory shot, index 0 (the new shot is shot 1);
each slot's text is the text of the shot of its first tile.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from student.context import Context, FrameFn, TextFn
from student.settings import SIMILARITIES, StudentSettings
from teacher.context import RANKED, evenly_spaced


def memory_candidates(lengths: Sequence[int], budget: int, max_candidates: int) -> list[tuple[int, int]]:
    """(shot, frame) of the candidate frames after history shots of `lengths` frames, in time order."""
    picks = [(k, f) for k, n in enumerate(lengths) for f in evenly_spaced(n, budget)]
    return picks[max(0, len(picks) - max_candidates):]


def rank(scores: Sequence[float]) -> list[int]:
    """Candidate indices (time order) from most to least similar; ties rank the more recent first."""
    return sorted(range(len(scores)), key=lambda i: (-float(scores[i]), -i))


def retrieve(scores: Sequence[float], budget: int) -> list[int]:
    """The `budget` most similar candidates, in time order."""
    return sorted(rank(scores)[:budget])


@dataclass(frozen=True)
class Tile:
    """Where a ranked candidate lands in the packed memory: slot and rectangle (latent pixels)."""

    slot: int
    top: int
    left: int
    height: int
    width: int


def pack_layout(count: int, pack_frames: int, height: int, width: int) -> list[Tile]:
    """Tiles of the first `count` ranked candidates (fewer when the last slot is full; module doc)."""
    if pack_frames < 1:
        raise ValueError(f"data.context.pack_frames must be >= 1, got {pack_frames}")
    tiles = [Tile(s, 0, 0, height, width) for s in range(min(count, pack_frames - 1))]
    top, left, h, w = 0, 0, height, width
    while len(tiles) < count and (h > 1 or w > 1):
        if h >= w:
            tiles.append(Tile(pack_frames - 1, top, left, h // 2, w))
            top, h = top + h // 2, h - h // 2
        else:
            tiles.append(Tile(pack_frames - 1, top, left, h, w // 2))
            left, w = left + w // 2, w - w // 2
    return tiles


def pack(frames: Sequence[torch.Tensor], pack_frames: int) -> tuple[torch.Tensor, list[Tile]]:
    """Ranked frames [..., C, h, w] packed into [..., C, n, h, w] (n slots used) and their tiles."""
    *lead, c, h, w = frames[0].shape
    tiles = pack_layout(len(frames), pack_frames, h, w)
    out = frames[0].new_zeros(*lead, c, tiles[-1].slot + 1, h, w)
    for x, t in zip(frames, tiles):
        small = F.interpolate(x.reshape(-1, c, h, w).float(), size=(t.height, t.width), mode="area")
        out[..., t.slot, t.top:t.top + t.height, t.left:t.left + t.width] = small.reshape(*lead, c, t.height,
                                                                                          t.width).to(out.dtype)
    return out, tiles


# ---- similarity ---------------------------------------------------------------------------------
class OracleSimilarity:
    """Shared world terms between the prompt and a frame's shot caption (module doc)."""

    needs_images = False

    def __init__(self, vocabulary: Sequence[str]) -> None:
        if not vocabulary:
            raise ValueError("oracle similarity needs the world's vocabulary (colours, shapes, backgrounds)")
        self.vocabulary = frozenset(w.lower() for w in vocabulary)

    def terms(self, text: str) -> frozenset:
        words = re.findall(r"[a-z]+", text.lower())
        named = [w if w in self.vocabulary else None for w in words]
        pairs = {(a, b) for a, b in zip(named, named[1:]) if a and b}
        return frozenset({w for w in named if w} | pairs)

    def features(self, captions: Sequence[str], images: torch.Tensor | None = None) -> list[Any]:
        return [self.terms(c) for c in captions]

    def scores(self, prompt: str, features: Sequence[Any]) -> torch.Tensor:
        wanted = self.terms(prompt)
        return torch.tensor([float(len(wanted & f)) for f in features])


class ClipSimilarity:
    """Cosine of a CLIP-style model's prompt and frame embeddings (transformers CLIPModel)."""

    needs_images = True
    MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's defaults

    def __init__(self, model: torch.nn.Module, tokenizer: Any, mean: Sequence[float] = MEAN,
                 std: Sequence[float] = STD) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
        self.size = model.config.vision_config.image_size

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str = "cpu") -> "ClipSimilarity":
        """A local folder with a CLIPModel and its tokenizer (and image processor for mean/std)."""
        from transformers import AutoTokenizer, CLIPModel

        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"data.context.similarity.path {str(path)!r}: no CLIP model folder "
                                    "(config.json) there")
        model = CLIPModel.from_pretrained(folder).to(device)
        processor = folder / "preprocessor_config.json"
        mean, std = cls.MEAN, cls.STD
        if processor.is_file():
            import json
            values = json.loads(processor.read_text())
            mean, std = values.get("image_mean", mean), values.get("image_std", std)
        return cls(model, AutoTokenizer.from_pretrained(folder), mean, std)

    @staticmethod
    def _embedding(out: Any) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def features(self, captions: Sequence[str], images: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Normalised image embeddings of pixel frames [N, 3, H, W] in [-1, 1]."""
        if images is None:
            raise ValueError("clip similarity needs the frames' pixels")
        device = next(self.model.parameters()).device
        x = F.interpolate((images.float().to(device) + 1) / 2, size=(self.size, self.size), mode="bilinear",
                          align_corners=False)
        x = (x - self.mean.to(device)) / self.std.to(device)
        embedding = self._embedding(self.model.get_image_features(pixel_values=x))
        return list(F.normalize(embedding, dim=-1).cpu())

    @torch.no_grad()
    def scores(self, prompt: str, features: Sequence[torch.Tensor]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        tokens = self.tokenizer([prompt], padding=True, return_tensors="pt").to(device)
        text = self._embedding(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                           attention_mask=tokens.get("attention_mask")))
        return torch.stack(list(features)) @ F.normalize(text, dim=-1)[0].cpu()


def similarity_from(kind: str, path: str = "", vocabulary: Sequence[str] = (), device: torch.device | str = "cpu"):
    """The scorer `data.context.similarity` names."""
    if kind == "oracle":
        return OracleSimilarity(vocabulary)
    if kind == "clip":
        return ClipSimilarity.from_pretrained(path, device)
    raise ValueError(f"data.context.similarity.kind must be one of {SIMILARITIES}; got {kind!r}")


# ---- the rule -------------------------------------------------------------------------------------
@dataclass
class MemoryRule:
    """A ranked strategy with its scorer and sizes: picks a history's context (module doc)."""

    strategy: str
    budget: int
    similarity: Any
    pack_frames: int = 2
    max_candidates: int = 64
    # latents [C, h, w] -> pixels [3, H, W] of one frame: how a scorer that looks at images sees a history
    # that only has latents (prepared data); None: callers give the pixels
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.strategy not in RANKED:
            raise ValueError(f"memory rule strategy must be one of {RANKED}; got {self.strategy!r}")
        if self.max_candidates < 1:
            raise ValueError(f"data.context.max_candidates must be >= 1, got {self.max_candidates}")

    @classmethod
    def from_settings(cls, s: StudentSettings, budget: int | None = None,
                      device: torch.device | str = "cpu") -> "MemoryRule | None":
        """The rule a student's settings describe (budget: its context_frames unless given); None for
        the frame-count strategies."""
        if s.context_strategy not in RANKED:
            return None
        scorer = similarity_from(s.similarity, s.similarity_path, s.similarity_terms, device)
        return cls(s.context_strategy, s.context_frames if budget is None else budget, scorer, s.pack_frames,
                   s.max_candidates)

    def candidates(self, lengths: Sequence[int]) -> list[tuple[int, int]]:
        return memory_candidates(lengths, self.budget, self.max_candidates)

    def frames(self, count: int, height: int, width: int) -> int:
        """Context frames the rule gives for `count` candidates on h x w latents."""
        if self.strategy == "retrieval":
            return min(count, self.budget)
        return pack_layout(count, self.pack_frames, height, width)[-1].slot + 1 if count else 0

    def pick(self, candidates: Sequence[tuple[int, int]], scores: Sequence[float], frame: FrameFn,
             text: TextFn) -> Context | None:
        """The context from scored candidates; `frame`/`text` read latents and texts as in pick_context."""
        if not candidates or (self.strategy == "retrieval" and self.budget == 0):
            return None
        if self.strategy == "retrieval":
            chosen = [candidates[i] for i in retrieve(scores, self.budget)]
            number = {k: i for i, k in enumerate(sorted({k for k, _ in chosen}))}
            latents = torch.stack([frame(k, f) for k, f in chosen], dim=-3)
            texts = torch.stack([text(k) for k, _ in chosen], dim=-3)
            shots = torch.tensor([number[k] for k, _ in chosen], dtype=torch.long)
        else:
            order = [candidates[i] for i in rank(scores)]
            latents, tiles = pack([frame(k, f) for k, f in order], self.pack_frames)
            firsts = {}
            for (k, _), t in zip(order, tiles):
                firsts.setdefault(t.slot, k)
            texts = torch.stack([text(firsts[s]) for s in range(latents.shape[-3])], dim=-3)
            shots = torch.zeros(latents.shape[-3], dtype=torch.long)
        if latents.ndim == 5:
            shots = shots.expand(latents.shape[0], -1)
        return Context(latents, texts, shots.to(latents.device))

    def history(self, lengths: Sequence[int], prompt: str, caption: Callable[[int], str], frame: FrameFn,
                text: TextFn, image: Callable[[int, int], torch.Tensor] | None = None,
                feature: Callable[[int, int], torch.Tensor] | None = None) -> Context | None:
        """Score the candidates of a history against `prompt` and pick (datasets, rollouts): `caption`
        gives a history shot's caption, `image` a frame's pixels [3, H, W], or `feature` its image
        feature computed beforehand (clip only; prepared data stores them)."""
        candidates = self.candidates(lengths)
        if not candidates:
            return None
        if self.similarity.needs_images and feature is not None:
            features = [feature(k, f) for k, f in candidates]
            return self.pick(candidates, self.similarity.scores(prompt, features), frame, text)
        images = None
        if self.similarity.needs_images:
            if image is None and self.decode is not None:
                image = lambda k, f: self.decode(frame(k, f))  # noqa: E731
            if image is None:
                raise ValueError("data.context.similarity.kind clip needs frame pixels here; use oracle")
            images = torch.stack([image(k, f) for k, f in candidates])
        features = self.similarity.features([caption(k) for k, _ in candidates], images)
        return self.pick(candidates, self.similarity.scores(prompt, features), frame, text)
