"""Chunk-causal attention throughput on a GPU: our Triton kernel against FlexAttention, SDPA with a
dense boolean mask, and a loop of dense SDPA calls per chunk; bf16, forward and backward, at the
training shape (2 context chunks + 9 chunks, queries = keys) and the decoding shape (one chunk of
queries over a full cache: 2 global + 7 local chunks + itself, every key visible).

TFLOP/s count visible (query, key) pairs only: forward 4·pairs·D, backward 2.5× that (the
FlashAttention convention). The table and the tile census go into benchmarks/RESULTS.md under
"## Attention". Run: `python benchmarks/attention.py [--sweep]` (`--sweep` also times our kernel
over candidate tile shapes, to pick `kernels/kernel_config.py`'s table); `--census-only` refreshes
just the tile census, which needs no GPU.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels import chunk_causal_mask, triton_attention
from kernels.dispatch import flex_attention
from kernels.kernel_config import TileConfig, tile_configs
from kernels.reference import full_key_run, key_span, key_tiles, resolve_window, visible
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, also when loaded by path
import results  # noqa: E402

RESULTS = results.RESULTS
SECTION = "## Attention"

# Student geometry from notes/algorithms.md: a chunk is 3 latent frames of 1560 tokens; the
# global cache holds 2 chunks, the local cache 7; training sees 9 target chunks.
TOKENS_PER_CHUNK = 3 * 1560
HEADS, HEAD_DIM = 12, 128


@dataclass(frozen=True)
class Shape:
    """One benchmarked problem: `length` keys, `q_length` queries (default: as many, query i at key
    position i) and the mask geometry."""

    name: str
    length: int
    prefix_len: int
    chunk_len: int
    window_chunks: int | None = None
    q_length: int | None = None

    @property
    def queries(self) -> int:
        return self.length if self.q_length is None else self.q_length

    def geometry(self) -> dict:
        return dict(prefix_len=self.prefix_len, chunk_len=self.chunk_len, window_chunks=self.window_chunks)


def student_shapes(chunk: int = TOKENS_PER_CHUNK) -> list[Shape]:
    """The training shape (a prefix of 2 chunks + 9 chunks) and the decoding shape (one chunk of
    queries over 10 chunks of keys, all visible: the whole sequence is the prefix)."""
    prefix = 2 * chunk
    return [Shape("training", prefix + 9 * chunk, prefix, chunk),
            Shape("decoding", 10 * chunk, 10 * chunk, chunk, q_length=chunk)]


def visible_pairs(shape: Shape, device: torch.device, rows_per_step: int = 512) -> int:
    """Number of visible (query, key) pairs, counted with the mask rule a block of rows at a time."""
    window = resolve_window(shape.window_chunks, shape.length, shape.prefix_len, shape.chunk_len)
    k_pos = torch.arange(shape.length, device=device)[None, :]
    total = 0
    for r0 in range(0, shape.queries, rows_per_step):
        rows = torch.arange(r0, min(r0 + rows_per_step, shape.queries), device=device)[:, None]
        total += int(visible(rows, k_pos, shape.prefix_len, shape.chunk_len, window).sum())
    return total


def tile_census(shape: Shape, block_m: int, block_n: int) -> dict[str, float]:
    """Fractions of (query tile, key tile) pairs the forward kernel runs unmasked, masked, or skips."""
    length = shape.length
    window = resolve_window(shape.window_chunks, length, shape.prefix_len, shape.chunk_len)
    geo = (shape.prefix_len, shape.chunk_len, window)
    n_q, n_k = -(-length // block_m), -(-length // block_n)
    full = visited = 0
    for m in range(n_q):
        q0 = m * block_m
        n_prefix, c0, c1 = key_tiles(q0, block_m, length, length, block_n, *geo)
        for start, end in ((0, n_prefix), (c0, c1)):
            f0, f1 = full_key_run(q0, start, end, block_m, block_n, length, *geo)
            visited += end - start
            full += f1 - f0
    total = n_q * n_k
    return {"full": full / total, "partial": (visited - full) / total, "skipped": 1 - visited / total}


# ---------------------------------------------------------------------------------------------
# The contenders: each takes q, k, v as [B, L, H, D] and returns [B, L, H, D]


def run_triton(shape: Shape):
    """Our kernel as it is (no self-check); fewer queries than keys go to the autograd Function directly."""
    if shape.q_length is None:
        return lambda q, k, v: triton_attention(q, k, v, **shape.geometry())
    from kernels.chunk_attention import ChunkCausalAttention

    return lambda q, k, v: ChunkCausalAttention.apply(q, k, v, shape.prefix_len, shape.chunk_len, shape.window_chunks)


def run_flex(shape: Shape):
    """FlexAttention with a block mask built from the same rule: the dispatcher's `flex` backend
    (compiled on CUDA, block mask cached per shape; on CPU eager and forward only)."""
    return lambda q, k, v: flex_attention(q, k, v, **shape.geometry())


def run_sdpa_dense_mask(shape: Shape, device: str = "cuda"):
    """SDPA with the dense [Lq, Lk] boolean mask (the sdpa backend), the mask built once outside timing."""
    mask = chunk_causal_mask(shape.queries, shape.length, **shape.geometry(), device=device)

    def fn(q, k, v):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2)
    return fn


def run_chunk_loop(shape: Shape):
    """One unmasked SDPA call per query chunk over the keys that chunk sees (prefix + key_span)."""
    length = shape.length
    window = resolve_window(shape.window_chunks, length, shape.prefix_len, shape.chunk_len)
    starts = sorted({0, *range(shape.prefix_len, shape.queries, shape.chunk_len)} - {shape.queries})
    segments = []
    for a, b in zip(starts, [*starts[1:], shape.queries]):
        lo, hi = key_span(a, b - 1, length, shape.prefix_len, shape.chunk_len, window)
        prefix = min(shape.prefix_len, length)
        spans = [(0, prefix)] if prefix > 0 else []
        if hi > max(lo, prefix):
            # adjoining spans become one slice, so the loop pays for a copy only under a window
            spans = [(0, hi)] if lo <= prefix else spans + [(lo, hi)]
        segments.append((a, b, spans))

    def fn(q, k, v):
        outs = []
        for r0, r1, spans in segments:
            keys = torch.cat([k[:, s:e] for s, e in spans], 1).transpose(1, 2)
            values = torch.cat([v[:, s:e] for s, e in spans], 1).transpose(1, 2)
            outs.append(F.scaled_dot_product_attention(q[:, r0:r1].transpose(1, 2), keys, values).transpose(1, 2))
        return torch.cat(outs, 1)
    return fn


CONTENDERS = {"triton (ours)": run_triton, "flex_attention": run_flex, "sdpa + dense bool mask": run_sdpa_dense_mask,
              "sdpa loop per chunk": run_chunk_loop}


# ---------------------------------------------------------------------------------------------
# Timing and the report


def _cpu_ms(fn, repeats: int = 3) -> float:
    import statistics
    import time

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_ms(fn, q, k, v, dout) -> tuple[float, float]:
    """(forward ms, backward ms) medians (triton's do_bench on CUDA, a plain timer on CPU); the
    backward replays one retained graph."""
    if q.is_cuda:
        from triton.testing import do_bench

        bench = lambda f, **kw: do_bench(f, return_mode="median", **kw)  # noqa: E731
    else:
        bench = lambda f, **kw: _cpu_ms(f, repeats=1)  # noqa: E731 - CPU: the smoke run, not a measurement
    forward = bench(lambda: fn(q, k, v))
    out = fn(q, k, v)
    backward = bench(lambda: out.backward(dout, retain_graph=True), grad_to_none=[q, k, v])
    return forward, backward


def bench_shape(shape: Shape, batch: int = 1, heads: int = HEADS, head_dim: int = HEAD_DIM, device: str = "cuda",
                dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """One row per contender: ms and TFLOP/s forward and backward, and max |out - ours|. A contender
    that cannot run here (out of memory, no CPU backward) gets its reason instead."""
    g = torch.Generator(device=device).manual_seed(0)

    def make(n: int) -> torch.Tensor:
        return torch.randn(batch, n, heads, head_dim, device=device, dtype=dtype, generator=g).requires_grad_(True)
    q, k, v = make(shape.queries), make(shape.length), make(shape.length)
    dout = torch.randn_like(q)
    flop_fwd = 4.0 * visible_pairs(shape, q.device) * head_dim * batch * heads
    ours = None
    rows = []
    for name, build in CONTENDERS.items():
        fn = out = None
        try:
            fn = build(shape, device) if build is run_sdpa_dense_mask else build(shape)
            with torch.no_grad():
                out = fn(q, k, v)
            ours = out if ours is None else ours
            fwd, bwd = time_ms(fn, q, k, v, dout)
            rows.append(dict(name=name, fwd_ms=fwd, bwd_ms=bwd, fwd_tflops=flop_fwd / fwd / 1e9,
                             bwd_tflops=2.5 * flop_fwd / bwd / 1e9, max_diff=(out - ours).abs().max().item()))
        except torch.OutOfMemoryError:
            rows.append(dict(name=name, error="out of memory"))
        except Exception as e:  # noqa: BLE001 - e.g. FlexAttention's missing CPU backward: a row, not a crash
            first = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
            rows.append(dict(name=name, error=f"{type(e).__name__}{' on CPU' if not q.is_cuda else ': ' + first}"))
        fn = out = None  # drop this contender's buffers (a dense mask is GBs) before the next one
        if q.is_cuda:
            torch.cuda.empty_cache()
    return rows


# Candidate tiles per kernel for --sweep (block_m, block_n, warps, stages); the others keep the table's.
SWEEP = {
    "forward": [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4)],
    "dkdv": [(32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 3), (16, 128, 4, 4)],
    "dq": [(128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 4, 3)],
}


def sweep_tiles(shape: Shape) -> list[dict]:
    """Our kernel's TFLOP/s on one shape for each candidate tile of each kernel (bf16, d128)."""
    import triton
    from triton.testing import do_bench

    from kernels.chunk_attention import attention_backward, attention_forward

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, shape.length, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    dout = torch.randn_like(q)
    window = resolve_window(shape.window_chunks, shape.length, shape.prefix_len, shape.chunk_len)
    launch = (shape.prefix_len, shape.chunk_len, window)
    flop_fwd = 4.0 * visible_pairs(shape, q.device) * HEAD_DIM * HEADS
    default = tile_configs(HEAD_DIM, torch.bfloat16, on_cuda=True)
    rows = []
    for kernel, candidates in SWEEP.items():
        for candidate in candidates:
            configs = {**default, kernel: TileConfig(*candidate)}
            out, lse = attention_forward(q, k, v, launch, default)
            run = ((lambda: attention_forward(q, k, v, launch, configs)) if kernel == "forward" else
                   (lambda: attention_backward(q, k, v, out, lse, dout, launch, configs)))
            flop = flop_fwd if kernel == "forward" else 2.5 * flop_fwd
            try:
                ms = do_bench(run, return_mode="median")
                rows.append(dict(kernel=kernel, tile=candidate, ms=ms, tflops=flop / ms / 1e9))
            except triton.runtime.errors.OutOfResources as err:
                rows.append(dict(kernel=kernel, tile=candidate, error=str(err).splitlines()[0]))
    return rows


def format_sweep(shape: Shape, rows: list[dict]) -> list[str]:
    """Markdown lines of the tile sweep; backward rows time dK/dV and dQ together."""
    lines = [f"### Tile sweep ({shape.name} shape; backward = dK/dV + dQ, one kernel's tile varied)", "",
             "| kernel | block_m x block_n | warps | stages | ms | TFLOP/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        bm, bn, warps, stages = r["tile"]
        result = r["error"] + " | " if "error" in r else f"{r['ms']:.2f} | {r['tflops']:.0f}"
        lines.append(f"| {r['kernel']} | {bm}x{bn} | {warps} | {stages} | {result} |")
    return lines + [""]


def format_table(heading: str, rows: list[dict], ms: str = ".2f", tflops: str = ".0f") -> list[str]:
    """Markdown lines of one shape's contenders (bench_shape's rows)."""
    lines = [heading, "", "| kernel | fwd ms | fwd TFLOP/s | bwd ms | bwd TFLOP/s | max abs diff vs ours |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['error']} | | | | |")
        else:
            lines.append(f"| {r['name']} | {r['fwd_ms']:{ms}} | {r['fwd_tflops']:{tflops}} | {r['bwd_ms']:{ms}} | "
                         f"{r['bwd_tflops']:{tflops}} | {r['max_diff']:.1e} |")
    return lines + [""]


def format_section(gpu: str | None, tables: dict[str, list[dict]], census: dict[str, dict],
                   sweep: list[str] | None = None) -> str:
    """The markdown of the "## Attention" section."""
    lines = [SECTION, "", "Chunk-causal attention, bf16, 12 heads x 128, batch 1; TFLOP/s count visible pairs only",
             "(forward 4·pairs·D, backward 2.5x forward). Produced by `python benchmarks/attention.py`.",
             "Published anchors for scale (notes/algorithms.md; H100, bf16, d128; not measured here):",
             "FlashAttention-2 fwd ~335-370 / bwd ~320, FlashAttention-3 fwd ~600-650 / bwd ~560,",
             "FlexAttention fwd ~400.", ""]
    if gpu is None:
        lines += ["**GPU table: not measured yet** (no GPU was available when this section was written; run",
                  "`python benchmarks/attention.py` on a CUDA machine to fill it in).", ""]
    else:
        tiles = ", ".join(f"{name} {c.block_m}x{c.block_n} ({c.num_warps} warps, {c.num_stages} stages)"
                          for name, c in tile_configs(HEAD_DIM, torch.bfloat16, on_cuda=True).items())
        lines += [f"GPU: {gpu}, torch {torch.__version__}. Triton tiles: {tiles}.", ""]
        for shape_name, rows in tables.items():
            lines += format_table(f"### {shape_name}", rows)
        lines += sweep or []
    lines += ["### Tile census (computed from the mask rule, no GPU needed)", "",
              "| shape | tiles (q x k) | full (unmasked) | partial (masked) | skipped (never loaded) |",
              "|---|---|---|---|---|"]
    for label, c in census.items():
        lines.append(f"| {label} | {c['tiles']} | {c['full']:.1%} | {c['partial']:.1%} | {c['skipped']:.1%} |")
    return "\n".join(lines) + "\n"


def write_section(text: str, path: Path = RESULTS) -> None:
    """Replace (or append) the "## Attention" section of RESULTS.md, atomically."""
    results.write_section(text, path)


def shape_label(s: Shape) -> str:
    if s.q_length is None:
        return f"{s.name}: {s.length} tokens (prefix {s.prefix_len}, chunk {s.chunk_len})"
    return f"{s.name}: {s.queries} queries over {s.length} keys (all visible)"


def census_rows() -> dict[str, dict]:
    """Tile census of the student shapes at 128x128 tiles and at the kernels' own forward tiles."""
    fwd = tile_configs(HEAD_DIM, torch.bfloat16, on_cuda=True)["forward"]
    rows = {}
    for shape in student_shapes()[:1]:  # queries = keys: the training shape
        for bm, bn in {(128, 128), (fwd.block_m, fwd.block_n)}:
            c = tile_census(shape, bm, bn)
            c["tiles"] = f"{-(-shape.length // bm)} x {-(-shape.length // bn)}"
            rows[f"{shape.name}, {bm}x{bn} tiles"] = c
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--census-only", action="store_true", help="refresh only the tile census (no GPU needed)")
    parser.add_argument("--sweep", action="store_true", help="also time our kernel over candidate tile shapes")
    args = parser.parse_args(argv)
    if args.census_only:
        write_section(format_section(None, {}, census_rows()))
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/attention.py: needs a CUDA GPU and none is visible "
                         "(use --census-only to refresh the tile census without one)")
    census = census_rows()
    tables = {shape_label(s): bench_shape(s) for s in student_shapes()}
    train = student_shapes()[0]
    sweep = format_sweep(train, sweep_tiles(train)) if args.sweep else None
    write_section(format_section(torch.cuda.get_device_name(), tables, census, sweep))
    print(RESULTS.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
