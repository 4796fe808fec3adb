"""The history that conditions a shot, as one object, and the one function that builds it.

A `Context` holds the clean latents of the picked history frames, each frame's own text (global ⊕
its shot's caption) and each frame's shot index; training may noise its frames, and then `timesteps`
[B, Fc] holds each frame's timestep (distill/context_noise.py; None: clean, at t = 0). Unbatched (a
dataset item) it is latents [C, Fc, h, w], texts [Fc, L, D], shots [Fc]; batched it is
[B, C, Fc, h, w], [B, Fc, L, D], [B, Fc]. Fc may be 0 (a first shot): datasets keep such empty contexts so that items collate, and
`Context.nonempty` turns them into None for the models, whose keyword arguments `kwargs` gives.

`pick_context` applies the sampling rule (teacher/context.py) to a history and reads the picked
frames and texts through two accessors, so datasets (prepared shards), Self Forcing rollouts and
the streaming generator (generated shots) and the eval probes all pick frames the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from student.settings import NEGATIVE_SCOPES
from teacher.context import sample_context


@dataclass
class Context:
    """History latents, their texts and shot indices (see module doc for the shapes)."""

    latents: torch.Tensor
    texts: torch.Tensor
    shots: torch.Tensor
    # [B, Fc] timestep of each frame when the latents were noised for training; None: clean (t = 0). Set on
    # batched contexts only, after collation (`stack` and `cat` build clean contexts)
    timesteps: torch.Tensor | None = None

    @property
    def frames(self) -> int:
        return self.shots.shape[-1]

    @property
    def nonempty(self) -> "Context | None":
        """Itself, or None when it holds no frame (a first shot)."""
        return self if self.frames else None

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Context":
        """Latents and texts moved (and cast to `dtype`); shot indices stay long."""
        timesteps = None if self.timesteps is None else self.timesteps.to(device=device)
        return Context(self.latents.to(device=device, dtype=dtype), self.texts.to(device=device, dtype=dtype),
                       self.shots.to(device=device, dtype=torch.long), timesteps)

    def kwargs(self) -> dict[str, torch.Tensor]:
        """The models' context keyword arguments (NextShotTeacher / CausalStudent forward); noised frames'
        timesteps only when set (the teacher takes them, the student's cache holds clean frames only)."""
        out = {"context": self.latents, "context_text": self.texts, "context_shots": self.shots}
        if self.timesteps is not None:
            out["context_timesteps"] = self.timesteps
        return out

    @staticmethod
    def empty_like(latents: torch.Tensor, text: torch.Tensor) -> "Context":
        """No history, shaped for an unbatched item with target latents [C, F, h, w] and text [L, D]."""
        return Context(latents.new_zeros(latents.shape[0], 0, *latents.shape[2:]), text.new_zeros(0, *text.shape),
                       torch.zeros(0, dtype=torch.long))

    @staticmethod
    def cat(parts: Sequence["Context | None"]) -> "Context | None":
        """The frames of several contexts, in order (None parts skipped; None if all are)."""
        parts = [p for p in parts if p is not None]
        if not parts:
            return None
        return Context(torch.cat([p.latents for p in parts], dim=-3),
                       torch.cat([p.texts for p in parts], dim=-3), torch.cat([p.shots for p in parts], dim=-1))

    @staticmethod
    def stack(items: Sequence["Context"]) -> "Context":
        """A batch of unbatched contexts of equal length."""
        return Context(torch.stack([c.latents for c in items]), torch.stack([c.texts for c in items]),
                       torch.stack([c.shots for c in items]))


def kwargs_of(context: Context | None) -> dict[str, torch.Tensor]:
    """`context.kwargs()`, or no arguments for no context."""
    return {} if context is None else context.kwargs()


def denoisers(model: Callable, context: Context | None, negative_scope: str) -> tuple[Callable, Callable]:
    """(conditional, unconditional) denoisers (x_t, t, text) -> v of a next-shot model given a history.
    The unconditional text (CFG's negative) replaces every frame's text, the context frames' too
    ("all": the official convention, what text dropout trains), or only the target's ("target")."""
    if negative_scope not in NEGATIVE_SCOPES:
        raise ValueError(f"negative scope must be one of {NEGATIVE_SCOPES}; got {negative_scope!r}")
    cond = lambda x, t, text: model(x, t, text, **kwargs_of(context))  # noqa: E731
    if context is None or negative_scope == "target":
        return cond, cond

    def uncond(x, t, text):
        texts = text[:, None].expand_as(context.texts).to(context.texts.dtype)
        return model(x, t, text, **replace(context, texts=texts).kwargs())

    return cond, uncond


# (history shot k, frame f inside it) -> that frame's latents [..., C, h, w]
FrameFn = Callable[[int, int], torch.Tensor]
# history shot k -> its text [..., L, D]
TextFn = Callable[[int], torch.Tensor]


def pick_context(lengths: Sequence[int], strategy: str, budget: int, frame: FrameFn, text: TextFn,
                 limit: int | None = None, renumber: bool = False) -> Context | None:
    """The context of the next shot after history shots of `lengths` frames (None: nothing picked).

    Frames are chosen by the sampling rule (`limit`: see `sample_context`); `frame` and `text` read
    them (unbatched [C, h, w] / [L, D], or batched [B, C, h, w] / [B, L, D]). `renumber` numbers the
    picked shots 0, 1, ... in time order instead of by their history index (a stream whose oldest
    shots are no longer picked).
    """
    picks = sample_context(lengths, strategy, budget, limit)
    if not picks:
        return None
    number = {k: i for i, k in enumerate(sorted({k for k, _ in picks}))} if renumber else None
    latents = torch.stack([frame(k, f) for k, f in picks], dim=-3)
    texts = torch.stack([text(k) for k, _ in picks], dim=-3)
    shots = torch.tensor([number[k] if number else k for k, _ in picks], dtype=torch.long)
    if latents.ndim == 5:
        shots = shots.expand(latents.shape[0], -1)
    return Context(latents, texts, shots.to(latents.device))


def drop_text(text: torch.Tensor, context: Context | None, p: float
              ) -> tuple[torch.Tensor, Context | None, torch.Tensor]:
    """Text dropout: each sample, with probability p, trains with every frame's text zeroed, the target's
    and its context frames' (the unconditional branch of CFG, `sampler.negative_scope: all`); returns
    (text, context, which samples dropped [B])."""
    if p == 0:  # no draw: runs without dropout keep their random stream
        return text, context, torch.zeros(text.shape[0], dtype=torch.bool)
    dropped = torch.rand(text.shape[0]) < p
    keep = (~dropped).to(text.device, text.dtype)
    text = text * keep[:, None, None]
    if context is not None:
        context = replace(context, texts=context.texts * keep[:, None, None, None])
    return text, context, dropped
