"""Faster per-chunk passes for streaming: torch.compile, and on CUDA a captured CUDA graph.

`compile` modes (StreamingGenerator, ShotStreamPipeline, `shotdistill generate --compile`):

- none: eager, the reference.
- regions: each block's FFN and norms compiled (regional compile; modules of one class share one
  graph). Attention, RoPE and the cache stay eager, so any shape works; the cheapest compile.
- compile: the whole chunk pass (every block, RoPE, time embedding, head) compiled as one graph
  (fullgraph, dynamic=False). The KV cache gives it fixed shapes (student/cache.py, fixed-shape
  passes): every chunk of every shot has the same input shapes, so there is one graph for the
  denoising passes and one for the t = 0 pass that caches the chunk (two more when a learnable shot
  indicator marks a shot's first chunk), however many chunks and shots are generated.
- cudagraph (CUDA only): `compile`, and each of those graphs is captured as a CUDA graph on its
  first call and replayed after, so a pass costs a few input copies and one launch; the generator
  also decodes chunk k on a side stream while chunk k+1 denoises (student/generator.py). Graphs
  are per generator (its cache buffer is their input), and each holds its pass's activations in a
  memory pool shared by that generator's graphs: a server with many sessions pays that per session.

The t = 0 context pass that rebuilds the global cache runs eagerly in every mode: its length is
the number of context frames, which grows with the first shots, and it runs once per shot.

Outputs equal eager up to float rounding: the fixed-shape pass attends to the whole cache buffer
with a mask instead of slicing the visible keys, which changes only the order of the sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from student.cache import FixedWriter, KVCache
from student.model import CausalStudent
from teacher.backbone import TextKV

MODES = ("none", "regions", "compile", "cudagraph")
# torch.compile backend of every mode, read when a stream is built; benchmarks/gpu.py --smoke sets "eager"
# (dynamo traces every graph and checks its guards, but generates no code)
BACKEND = "inductor"


def check_mode(mode: str, device: torch.device | str) -> str:
    """`mode` if it is a known compile mode that can run on `device`; else a one-line ValueError."""
    if mode not in MODES:
        raise ValueError(f"compile must be one of {', '.join(MODES)}; got {mode!r}")
    if mode == "cudagraph" and torch.device(device).type != "cuda":
        raise ValueError(f"compile 'cudagraph' needs a CUDA device; the student is on {torch.device(device)} "
                         "(use 'compile')")
    return mode


def compile_regions(student: CausalStudent, backend: str | None = None) -> int:
    """Compile each block's FFN and norms in place (once per student); returns how many modules.
    Whole blocks are not compiled: the backbone passes the layer number and the cache by argument,
    which a compiled block would specialise on, recompiling for every layer."""
    backend = backend or BACKEND
    if getattr(student, "_compiled_regions", None) == backend:
        return 0
    count = 0
    for block in student.transformer.blocks:
        for module in (block.ffn, block.norm1, block.norm2, block.norm3, block.attn1.norm_q, block.attn1.norm_k,
                       block.attn2.norm_q):
            module.compile(backend=backend)  # shapes that change (the context pass) turn dynamic after one recompile
            count += 1
    student._compiled_regions = backend
    return count


def _masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """SDPA on [B, L, H, D] tensors over the keys where `visible` [T] is True."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=visible.view(1, 1, 1, -1))
    return out.transpose(1, 2)


def fixed_chunk_pass(student: CausalStudent, x: torch.Tensor, timesteps: torch.Tensor, positions: torch.Tensor,
                     phases: torch.Tensor, text_keys: list[torch.Tensor], text_values: list[torch.Tensor],
                     buffer: torch.Tensor, index: torch.Tensor, visible: torch.Tensor, marked: bool,
                     out_frames: int) -> torch.Tensor | None:
    """One chunk pass in fixed-shape form: `CausalStudent.run` with the cache buffer written at
    `index` and attended where `visible` (KVCache.fixed_chunk_pass). Only tensors vary between calls."""
    frames = x.shape[2]
    attention = lambda q, k, v: _masked_attention(q, k, v, visible)  # noqa: E731
    return student.run(x, timesteps, positions, TextKV(list(text_keys), list(text_values)), None, attention,
                       FixedWriter(buffer, index), (0, frames) if marked else None, out_frames=out_frames,
                       phases=phases)


_COMPILED = {}


def compiled_chunk_pass(backend: str | None = None):
    """`fixed_chunk_pass` under torch.compile, one per backend and process: generators share its graphs
    (dynamo's guards hold for every student of the same architecture, dtype and device)."""
    backend = backend or BACKEND
    if backend not in _COMPILED:
        _COMPILED[backend] = torch.compile(fixed_chunk_pass, backend=backend, fullgraph=True, dynamic=False)
    return _COMPILED[backend]


class FixedChunkPasses:
    """The chunk passes of one stream in fixed-shape form, compiled ("compile") and replayed as CUDA
    graphs ("cudagraph"). Called by ChunkStream in place of its eager pass."""

    def __init__(self, student: CausalStudent, cache: KVCache, mode: str) -> None:
        if cache.buffer is None:
            raise ValueError(f"compile {mode!r} needs the detached KV cache (inference), not keep_graph")
        self.student, self.cache, self.mode = student, cache, mode
        self.run = compiled_chunk_pass()
        self.graphs: dict[tuple[bool, int], _CapturedPass] = {}
        self.pool = torch.cuda.graph_pool_handle() if mode == "cudagraph" else None

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, positions: torch.Tensor, phases: torch.Tensor,
                 text: TextKV, marked: bool, out_frames: int) -> torch.Tensor | None:
        index, visible = self.cache.fixed_chunk_pass()
        marked = marked and self.student.shot_indicator is not None  # nothing to add: one graph fewer
        # dense inputs: a CUDA graph's static copies then have the strides the graphs were compiled for
        timesteps, phases = timesteps.contiguous(), phases.contiguous()
        args = (x, timesteps, positions, phases, text.keys, text.values, self.cache.buffer, index, visible)
        if self.mode == "compile":
            out = self.run(self.student, *args, marked, out_frames)
        else:
            key = (marked, out_frames)
            if key not in self.graphs:
                self.graphs[key] = _CapturedPass(lambda *a: self.run(self.student, *a, marked, out_frames),
                                                 args, self.pool)
            out = self.graphs[key](args)
        self.cache.finish_fixed(commit=out_frames == 0)
        return out


class _CapturedPass:
    """One pass captured as a CUDA graph with static copies of its inputs. The cache buffer is used in
    place (it never moves) and the text K/V are copied only when the shot's text changes.

    It is captured lazily at its first call, with that call's inputs: the warm-up runs (which
    compile) and the replay that follows recompute and rewrite the same cache slot, so running the
    pass more than once is harmless."""

    def __init__(self, run, args: tuple, pool) -> None:
        x, timesteps, positions, phases, keys, values, buffer, index, visible = args
        self.buffer, self.text = buffer, None
        self.inputs = [t.clone() for t in (x, timesteps, positions, phases, index, visible)]
        self.keys, self.values = [k.clone() for k in keys], [v.clone() for v in values]
        static = (*self.inputs[:4], self.keys, self.values, buffer, *self.inputs[4:])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # compile, and let lazy initialisation happen outside the capture
                run(*static)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a server thread using the GPU meanwhile does not invalidate this capture
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.out = run(*static)
        self.text = keys

    def __call__(self, args: tuple) -> torch.Tensor | None:
        x, timesteps, positions, phases, keys, values, buffer, index, visible = args
        if buffer is not self.buffer:
            raise RuntimeError("a captured chunk pass is bound to its cache buffer; the buffer was replaced")
        for static, given in zip(self.inputs, (x, timesteps, positions, phases, index, visible)):
            static.copy_(given)
        if keys is not self.text:  # a new shot's text
            for static, given in zip(self.keys + self.values, list(keys) + list(values)):
                static.copy_(given)
            self.text = keys
        self.graph.replay()
        return None if self.out is None else self.out.clone()  # the next replay overwrites self.out
