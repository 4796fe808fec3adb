"""Self Forcing rollouts: the student generates shots chunk by chunk through its caches, as at inference.

The stepping is `student.sampling.ChunkStream` itself (begin_shot → next_chunk per chunk), so a
rollout computes what the streaming generator computes. Per chunk, with the iteration's exit step e:
steps 0..e-1 run without gradient, step e runs with gradient and its x0 is the chunk, and then the
t = 0 pass on the finished (detached) chunk writes its clean keys/values into the local cache,
without gradient.

Cache detach policy: the cache never carries a graph. Every K/V it keeps comes from a pass without
gradient (the t = 0 commit pass, and the context pass at a shot boundary), so the loss on chunk i
reaches the weights only through chunk i's exit-step pass, never back through the cache into
earlier chunks (Self Forcing's choice; earlier chunks get their own gradient from their own exit
step). Gradient rollouts use the cache's `keep_graph` mode: its exit-step pass attends to
`cat(stored K/V, current K/V)` instead of writing in place, so no tensor saved for backward is ever
overwritten (trap 1), and stored tensors have no history to leak (trap 2). Gradient checkpointing
(`train.gradient_checkpointing`) recomputes the exit-step pass in backward; each pass keeps its own
snapshot of the cache, so recomputation sees the same keys.

Multi-shot (inter-shot) rollouts rebuild the global cache at every shot boundary from the finished
shots (detached): `latent_context` picks latent frames directly; `ReencodedContext` decodes the
chosen pixel frames and encodes each on its own, the way the teacher saw context in training (with
PatchCodec both are the same numbers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from student.model import CausalStudent
from student.context import Context, pick_context
from student.memory import MemoryRule
from student.sampling import ChunkStream, latent_context
from teacher.encoders import Codec
from distill.seeds import derive_seed

# (finished shots' latents [B, C, F, H, W], their texts [B, L, D], captions=[sample][shot] or None: the
# ranked rules score the next shot's caption against the earlier ones) -> the next shot's context
ContextFn = Callable[..., Context | None]


def draw_exit_step(seed: int, step: int, steps: int) -> int:
    """The iteration's exit step in [0, steps): drawn on rank 0 from the stream ("exit-step", step),
    then broadcast, so every rank runs the same graph."""
    import torch.distributed as dist

    from distill.distributed import broadcast_object

    value = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        gen = torch.Generator().manual_seed(derive_seed(seed, "exit-step", step))
        value = int(torch.randint(steps, (1,), generator=gen))
    return int(broadcast_object(value))


@dataclass
class ShotRollout:
    """One generated shot and the conditioning the generator used for it."""

    x: torch.Tensor  # [B, C, F, H, W] float32, with gradient through the exit steps when enabled
    text: torch.Tensor  # [B, L, D]
    context: Context | None  # clean history (None: first shot)


def rollout_shot(stream: ChunkStream, chunks: int, exit_step: int | None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The current shot's `chunks` chunks, concatenated along time [B, C, chunks·chunk_frames, H, W]."""
    return torch.cat([stream.next_chunk(generator, exit_step=exit_step) for _ in range(chunks)], dim=2)


def latent_context_fn(strategy: str, budget: int) -> ContextFn:
    """Context frames taken as latent frames of the finished shots (teacher/context.py's rule)."""
    return lambda shots, texts, captions=None: latent_context(shots, texts, strategy, budget)


class ReencodedContext:
    """Context frames decoded to pixels and encoded one frame at a time by `codec` (Wan VAE: as the
    prepared data was); frames are chosen among each shot's pixel frames by the teacher's rule."""

    def __init__(self, codec: Codec, strategy: str, budget: int) -> None:
        self.codec, self.strategy, self.budget = codec, strategy, budget

    @torch.no_grad()
    def __call__(self, shots: Sequence[torch.Tensor], texts: Sequence[torch.Tensor],
                 captions: Sequence[Sequence[str]] | None = None) -> Context | None:
        pixels = [self.codec.decode(s.detach().float()) for s in shots]
        picked = pick_context([p.shape[2] for p in pixels], self.strategy, self.budget,
                              lambda k, f: pixels[k][:, :, f], lambda k: texts[k])
        if picked is None:
            return None
        latents = self.codec.encode_frames(picked.latents).to(shots[0].dtype)
        return Context(latents, picked.texts, picked.shots)


class RankedContext:
    """The ranked rules (retrieval, memory_pack; student/memory.py) on generated shots: each sample's
    candidate frames (latent frames, or with `codec` pixel frames encoded one at a time, as the prepared
    data was) scored against its next shot's caption."""

    def __init__(self, rule: MemoryRule, codec: Codec | None = None, reencode: bool = False) -> None:
        self.rule, self.codec, self.reencode = rule, codec, reencode

    @torch.no_grad()
    def __call__(self, shots: Sequence[torch.Tensor], texts: Sequence[torch.Tensor],
                 captions: Sequence[Sequence[str]] | None = None) -> Context | None:
        if not shots:
            return None
        if captions is None:
            raise ValueError(f"context strategy {self.rule.strategy!r} ranks history by the shots' captions; "
                             "this rollout was given none")
        looks = self.rule.similarity.needs_images
        pixels = [self.codec.decode(s.detach().float()) for s in shots] if self.reencode or looks else None
        lengths = [p.shape[2] for p in pixels] if self.reencode else [s.shape[2] for s in shots]
        candidates = self.rule.candidates(lengths)
        if self.reencode:
            picked = torch.stack([pixels[j][:, :, f] for j, f in candidates], dim=2)
            encoded = self.codec.encode_frames(picked).to(shots[0].dtype)  # [B, C, N, h, w]
            frame = lambda b: lambda j, f: encoded[b, :, candidates.index((j, f))]  # noqa: E731
        else:
            frame = lambda b: lambda j, f: shots[j][b, :, f].detach()  # noqa: E731
        image = (lambda b: lambda j, f: pixels[j][b, :, f]) if looks else (lambda b: None)  # noqa: E731
        k = len(shots)
        picked = [self.rule.history(lengths, captions[b][k], lambda j: captions[b][j], frame(b),
                                    lambda j: texts[j][b], image(b)) for b in range(shots[0].shape[0])]
        return Context.stack(picked)


def context_function(strategy: str, budget: int, memory: MemoryRule | None, codec: Codec,
                     from_latents: bool) -> ContextFn:
    """How generated shots become the next shot's context: their latent frames (`from_latents`) or pixel
    frames re-encoded one at a time; by the ranked rules when `memory` is given."""
    reencode = not from_latents
    if memory is not None:
        return RankedContext(memory, codec, reencode)
    return ReencodedContext(codec, strategy, budget) if reencode else latent_context_fn(strategy, budget)


def shots(output: list[dict]) -> list[ShotRollout]:
    """`SelfForcingGenerator`'s output as ShotRollout objects."""
    return [ShotRollout(**fields) for fields in output]


class SelfForcingGenerator(nn.Module):
    """The trained generator: a CausalStudent whose forward is a Self Forcing rollout.

    DeepSpeed wraps this module, so ZeRO-3 gathers parameters around the rollout's passes, and the
    export takes `.student`. Gradient flows when called with grad enabled (see module doc).
    """

    def __init__(self, student: CausalStudent, lockstep: bool = False) -> None:
        super().__init__()
        self.student = student
        # ZeRO-3 gathers parameters with collectives inside every submodule call, so all ranks must
        # call the student equally often: a rank whose shot has no context runs an idle context pass
        # when another rank's shot has one (intra-shot batches differ in history length per rank).
        self.lockstep = lockstep

    def external_parameters(self) -> list[nn.Parameter]:
        return self.student.external_parameters()

    def forward(self, texts: Sequence[torch.Tensor], chunks: int, exit_step: int | None, height: int,
                width: int, first_context: Context | None = None, context_fn: ContextFn | None = None,
                generator: torch.Generator | None = None, captions: Sequence[Sequence[str]] | None = None
                ) -> list[dict]:
        """Roll out one shot per text [B, L, D]: the first conditioned on `first_context` or nothing;
        each later one on `context_fn` of the shots generated so far (global cache rebuilt, local cache
        reset; `captions` [sample][shot] for the ranked rules). Returns each shot's ShotRollout fields
        as a dict (`shots(...)` turns them back): ZeRO-3 hooks backward onto the tensors of a module's output, which it finds in lists and dicts
        but not in dataclasses."""
        if len(texts) > 1 and context_fn is None:
            raise ValueError("a multi-shot rollout needs a context_fn to rebuild the global cache")
        stream = ChunkStream(self.student, texts[0].shape[0], height, width, keep_graph=torch.is_grad_enabled())
        out: list[ShotRollout] = []
        for k, text in enumerate(texts):
            text = text.to(stream.device, stream.dtype)
            context = first_context if k == 0 else context_fn([s.x.detach() for s in out], [s.text for s in out],
                                                              captions=captions)
            if context is not None:
                context = context.to(stream.device, stream.dtype)
            # agreed before any rank enters its context pass (whose gathers are collectives too)
            idle = self.lockstep and _any_rank(context is not None, stream.device) and context is None
            stream.begin_shot(text, context)
            if idle:
                _idle_context_pass(stream)
            x = rollout_shot(stream, chunks, exit_step, generator)
            out.append(ShotRollout(x, text, context))
        return [vars(shot) for shot in out]


def _any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on any rank (a collective every rank must call)."""
    from distill.distributed import all_sum

    return bool(all_sum(torch.tensor([float(flag)], device=device)).item() > 0)


@torch.no_grad()
def _idle_context_pass(stream: ChunkStream) -> None:
    """A context pass over one zero frame whose keys go nowhere: the same submodule calls as a real
    context pass, so ZeRO-3's parameter gathers stay matched across ranks."""
    from teacher.backbone import sdpa_attention

    s = stream.student
    frames = s.backbone.patch_size[0]
    x = torch.zeros(stream.batch, s.latent_channels, frames, stream.height, stream.width, device=stream.device,
                    dtype=stream.dtype)
    s.run(x, torch.zeros(stream.batch, frames, device=stream.device),
          torch.zeros(frames, dtype=torch.float64, device=stream.device), stream.text, None, sdpa_attention)
