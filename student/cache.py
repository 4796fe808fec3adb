"""The student's dual KV cache: a global (context) cache and a rolling local cache of the current shot.

Layout of the detached (default) mode: one preallocated tensor per cache, [layers, 2 (k|v), B, T, H, D]
with T = global_capacity + (local_chunks + 1) · chunk tokens, laid out as

    [ unused | global (context frames) | ring of local_chunks + 1 chunk slots ]

The global K/V are right-aligned against the ring, and chunk i of the shot always occupies ring slot
i mod (local_chunks + 1) — while it is being denoised and after its t = 0 pass (which overwrites the
noisy K/V in place). So the keys chunk i attends to (the context, the previous `local_chunks` chunks
of its shot, itself) are always one contiguous slice of the buffer and no pass allocates cache
memory. Keys need no particular order: RoPE is applied before caching and nothing inside that slice
is masked. Hence the full-sequence equivalent is `window_chunks = local_chunks + 1`.

Fixed-shape passes (student/compiled.py): `fixed_chunk_pass` gives a provider whose every chunk pass
has the same shapes, for torch.compile and CUDA graphs: the chunk's ring slot is a tensor of token
indices written with `index_copy_`, and the pass attends to the whole buffer with a boolean mask
(the context and the filled ring slots are visible), instead of slicing a span whose
length grows over the first chunks and with the context. The visible keys are the same, so the
result equals the sliced pass up to the order of the softmax sums.

Compressed local memory (`kernels`, student/compression.py): the local cache keeps past chunks
pooled by age instead of whole in a ring. The buffer is then laid out as

    [ unused | local history (pooled, newest first) | global (context frames) | current chunk ]

where the history is right-aligned against the context, which is right-aligned against the one
chunk slot: the keys a pass attends to are again one contiguous slice. When a chunk commits, the
history is rebuilt (the new chunk pooled, older ones pooled on to their next age's kernel, the
oldest dropped) and written back in place; its size is bounded by the kernels, so memory and time
per chunk stay flat.

Autograd policy:
- detached (default): the buffer never carries a graph. Writing a key that requires grad raises,
  because in-place overwrites of tensors saved for backward (and history kept by a `no_grad` write)
  are exactly the two known rollout bugs. Use it for inference and gradient-free rollout steps.
- keep_graph: nothing is written in place. Each pass attends to `cat(stored tensors, current k/v)`
  and a committed chunk's K/V are kept as the very tensors the pass produced (with their graph when
  the pass ran with gradient, without when it ran under no_grad — Self Forcing's t = 0 pass). Each
  pass gets its own snapshot of the stored tensors, so recomputation under gradient checkpointing
  sees the same keys even after later chunks were committed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from student.compression import age, check_grid, pooled_tokens


@dataclass(frozen=True)
class CacheShape:
    """Sizes of a cache: the model's layers/heads and the token geometry of a chunk."""

    layers: int
    batch: int
    heads: int
    head_dim: int
    frame_tokens: int
    chunk_frames: int
    global_frames: int
    local_chunks: int
    kernels: tuple[int, ...] = ()  # compressed local memory: pooling kernel per past chunk, newest first
    grid: tuple[int, int] = (0, 0)  # a latent frame's token grid (height, width), what the kernels pool

    @property
    def chunk_tokens(self) -> int:
        return self.chunk_frames * self.frame_tokens

    @property
    def global_tokens(self) -> int:
        return self.global_frames * self.frame_tokens

    @property
    def ring_slots(self) -> int:
        return 1 if self.kernels else self.local_chunks + 1

    def history_tokens(self, chunks: int) -> int:
        """Tokens of the compressed history after `chunks` commits (0 without compression)."""
        return sum(pooled_tokens(self.chunk_tokens, k) for k in self.kernels[:chunks])

    @property
    def start(self) -> int:
        """Buffer position where the context ends and the chunk slots begin."""
        return self.history_tokens(len(self.kernels)) + self.global_tokens


class _Writer:
    """KV provider of one pass: where its keys go and which keys it attends to."""

    def __init__(self, cache: "KVCache", kind: str, commit: bool) -> None:
        self.cache, self.kind, self.commit = cache, kind, commit
        self.recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.snapshot = None if cache.buffer is not None else (
            [] if kind == "global" else [list(cache.global_kv), [list(c) for c in cache.local_kv]])

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.cache.check_tokens(self.kind, k)
        if self.cache.buffer is not None:
            return self.cache.write(self.kind, layer, k, v)
        if self.commit:
            self.recorded[layer] = (k, v)
        if self.kind == "global":
            return k, v
        global_kv, local_kv = self.snapshot
        past = ([global_kv[layer]] if global_kv else []) + [chunk[layer] for chunk in local_kv]
        if not past:
            return k, v
        return (torch.cat([p[0] for p in past] + [k], dim=1), torch.cat([p[1] for p in past] + [v], dim=1))


class FixedWriter:
    """KV provider of a fixed-shape chunk pass: writes the chunk's K/V at `index` (token positions
    [chunk_tokens]) and attends to the whole buffer (the caller masks what is not visible)."""

    def __init__(self, buffer: torch.Tensor, index: torch.Tensor) -> None:
        self.buffer, self.index = buffer, index

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.buffer[layer, 0], self.buffer[layer, 1]
        keys.index_copy_(1, self.index, k.to(keys.dtype))
        values.index_copy_(1, self.index, v.to(values.dtype))
        return keys, values


class KVCache:
    """Global + local KV cache of the causal student for one stream of B rows (see module doc)."""

    def __init__(self, shape: CacheShape, dtype: torch.dtype, device: torch.device | str,
                 keep_graph: bool = False) -> None:
        if shape.local_chunks < 0 or shape.global_frames < 0 or shape.chunk_frames < 1:
            raise ValueError(f"cache sizes must be non-negative (chunk_frames >= 1); got {shape}")
        if shape.kernels:
            check_grid(shape.kernels, shape.grid)
        self.shape, self.keep_graph = shape, keep_graph
        tokens = shape.start + shape.ring_slots * shape.chunk_tokens
        self.buffer = None if keep_graph else torch.zeros(
            shape.layers, 2, shape.batch, tokens, shape.heads, shape.head_dim, dtype=dtype, device=device)
        self.global_len = 0  # tokens of the current context
        self.chunks = 0  # chunks of the current shot committed so far
        self.global_kv: list[tuple[torch.Tensor, torch.Tensor]] = []  # keep_graph: per layer
        self.local_kv: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # keep_graph: per chunk, per layer

    # ---- passes ---------------------------------------------------------------------------
    def context_pass(self, frames: int) -> _Writer:
        """Provider for the t = 0 pass over `frames` context frames; they replace the global cache and
        the local cache is cleared (a shot boundary). Call `finish(writer)` after the pass."""
        if frames > self.shape.global_frames:
            raise ValueError(f"{frames} context frames exceed the global cache's {self.shape.global_frames} "
                             f"frames (context budget)")
        self.global_len, self.chunks = frames * self.shape.frame_tokens, 0
        self.global_kv, self.local_kv = [], []
        return _Writer(self, "global", commit=True)

    def chunk_pass(self, commit: bool = False) -> _Writer:
        """Provider for a pass over the shot's next chunk; `commit=True` for its t = 0 pass, whose K/V
        stay in the local cache once `finish(writer)` is called."""
        return _Writer(self, "chunk", commit)

    def finish(self, writer: _Writer) -> None:
        """Keep what a committing pass wrote: the context's K/V or the chunk's clean K/V."""
        if not writer.commit:
            return
        if writer.kind == "chunk":
            self.chunks += 1
            if self.shape.kernels and self.buffer is not None:
                self._age_buffer()
        if self.buffer is not None or (writer.kind == "global" and not self.global_len):
            return
        if len(writer.recorded) != self.shape.layers:
            raise RuntimeError(f"a committing pass saw {len(writer.recorded)} of {self.shape.layers} layers")
        kv = [writer.recorded[layer] for layer in range(self.shape.layers)]
        if writer.kind == "global":
            self.global_kv = kv
        elif self.shape.kernels:  # newest first, each layer's (k, v) aged together
            aged = [age([c[layer][i] for c in self.local_kv], kv[layer][i], self.shape.kernels, self.shape.grid)
                    for layer in range(self.shape.layers) for i in (0, 1)]
            self.local_kv = [[(aged[2 * layer][j], aged[2 * layer + 1][j]) for layer in range(self.shape.layers)]
                             for j in range(len(aged[0]))]
        else:
            self.local_kv = (self.local_kv + [kv])[-self.shape.local_chunks:] if self.shape.local_chunks else []

    def fixed_chunk_pass(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(index, visible) of the shot's next chunk pass in fixed-shape form (module doc): the token
        positions of its ring slot [chunk_tokens] (long) and which of the buffer's T keys it attends
        to [T] (bool). `FixedWriter(buffer, index)` is its provider; a committing pass is followed
        by `finish_fixed(commit=True)`."""
        if self.buffer is None:
            raise RuntimeError("fixed-shape passes need the detached cache (keep_graph=False)")
        begin, lo, end = self._span()
        device = self.buffer.device
        index = torch.arange(lo, lo + self.shape.chunk_tokens, device=device)
        tokens = torch.arange(self.buffer.shape[3], device=device)
        return index, (tokens >= begin) & (tokens < end)

    def finish_fixed(self, commit: bool) -> None:
        """After a fixed-shape chunk pass: a committing one keeps its chunk (its K/V are in place)."""
        if commit:
            self.chunks += 1
            if self.shape.kernels:
                self._age_buffer()

    def reset(self) -> None:
        """Forget everything (a new stream); the buffer is kept."""
        self.global_len, self.chunks, self.global_kv, self.local_kv = 0, 0, [], []

    # ---- detached buffer ---------------------------------------------------------------------
    def check_tokens(self, kind: str, k: torch.Tensor) -> None:
        """The pass must carry exactly the tokens the cache was sized for."""
        want = self.global_len if kind == "global" else self.shape.chunk_tokens
        if k.shape[1] != want or k.shape[0] != self.shape.batch:
            raise ValueError(f"KV cache expected [{self.shape.batch}, {want}, ...] keys for a {kind} pass; "
                             f"got {list(k.shape)}")

    def write(self, kind: str, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy k/v into their place in the buffer and return the slice the pass attends to."""
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            raise RuntimeError("the detached KV cache cannot carry gradient; build it with keep_graph=True "
                               "or run the pass under torch.no_grad()")
        if kind == "global":
            begin, end = self.shape.start - self.global_len, self.shape.start
            self.buffer[layer, 0, :, begin:end].copy_(k)
            self.buffer[layer, 1, :, begin:end].copy_(v)
        else:
            begin, lo, end = self._span()
            self.buffer[layer, 0, :, lo:lo + self.shape.chunk_tokens].copy_(k)
            self.buffer[layer, 1, :, lo:lo + self.shape.chunk_tokens].copy_(v)
        return self.buffer[layer, 0, :, begin:end], self.buffer[layer, 1, :, begin:end]

    def _span(self) -> tuple[int, int, int]:
        """(begin, slot, end) of the next chunk pass: the first key it attends to, where its own K/V go,
        and the end of its keys."""
        shape, start = self.shape, self.shape.start
        if shape.kernels:
            return start - self.global_len - shape.history_tokens(self.chunks), start, start + shape.chunk_tokens
        lo = start + self.chunks % shape.ring_slots * shape.chunk_tokens
        return start - self.global_len, lo, start + min(self.chunks + 1, shape.ring_slots) * shape.chunk_tokens

    def _age_buffer(self) -> None:
        """After a commit in compressed mode: rebuild the pooled history from the committed chunk (in
        its slot) and the history before it, and write it back right-aligned against the context."""
        shape, start = self.shape, self.shape.start
        old_end = start - self.global_len
        old = shape.history_tokens(self.chunks - 1)
        sizes = [pooled_tokens(shape.chunk_tokens, k) for k in shape.kernels[:self.chunks - 1]]
        new = shape.history_tokens(self.chunks)
        for layer in range(shape.layers):
            for i in (0, 1):
                rows = self.buffer[layer, i]
                history = list(rows[:, old_end - old:old_end].split(sizes, dim=1)) if sizes else []
                aged = age(history, rows[:, start:start + shape.chunk_tokens], shape.kernels, shape.grid)
                rows[:, old_end - new:old_end].copy_(torch.cat(aged, dim=1))

    def attended_tokens(self) -> int:
        """How many keys the next chunk pass attends to (bounded by the cache size)."""
        begin, _, end = self._span()
        return end - begin
