"""The one chunk-causal mask rule, the tile geometry derived from it, and the SDPA reference.

Every function above the reference section uses only Python operators (`+ - * // < & |`), so the
same source runs on Python ints, on torch tensors, and, compiled by `kernels.chunk_attention` with
`triton.jit`, inside the Triton kernels. There is no second copy of the rule anywhere: the dense
mask, the tile classifier and the kernels all evaluate these functions. Because they are compiled
by Triton they may call only each other (the compiled copies are linked by name), never other
helpers, and must not use `min`/`max`/`if` on values: a comparison times a difference is used
instead (`a + (b - a) * (b > a)` is `max(a, b)`); `while` on scalars is fine. Python floors
integer division and Triton truncates, which differ only on negative operands, so every quotient
that can be negative is discarded by a comparison before it matters.

Queries and keys share positions: query row r sits at position r of the key sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Names of the functions compiled into the kernels; each may call only the ones before it.
RULE_FUNCTIONS = ("visible", "tile_full", "key_span", "query_span", "key_tiles", "query_tiles",
                  "full_key_run", "full_query_run")


def visible(q_pos, k_pos, prefix_len, chunk_len, window_chunks):
    """True where the key at `k_pos` is visible to the query at `q_pos` (DESIGN.md's rule).

    Prefix keys are seen by every query; past the prefix a query sees keys of its own and earlier
    chunks, at most `window_chunks - 1` chunks back. `window_chunks` is always a finite int here
    (`resolve_window` turns "no window" into one wider than any sequence).
    """
    q_chunk = (q_pos - prefix_len) // chunk_len
    k_chunk = (k_pos - prefix_len) // chunk_len
    both_past = (q_pos >= prefix_len) & (k_pos >= prefix_len)
    in_band = (k_chunk <= q_chunk) & (q_chunk - k_chunk < window_chunks)
    return (k_pos < prefix_len) | (both_past & in_band)


def tile_full(q0, k0, block_m, block_n, q_end, k_end, prefix_len, chunk_len, window_chunks):
    """True when the tile [q0, q0+block_m) x [k0, k0+block_n) is in bounds and entirely visible.

    Chunk indices grow with position, so past the prefix the chunk distance q - k over the tile
    runs from chunk(first query) - chunk(last key) to chunk(last query) - chunk(first key past
    the prefix), through every value between; the rule holds on the whole tile iff it holds at
    those two extreme pairs (prefix keys are always visible).
    """
    q_last = q0 + block_m - 1
    k_last = k0 + block_n - 1
    k_past = k0 + (prefix_len - k0) * (prefix_len > k0)
    k_past = k_past + (k_last - k_past) * (k_past > k_last)
    nearest = visible(q0, k_last, prefix_len, chunk_len, window_chunks)
    farthest = visible(q_last, k_past, prefix_len, chunk_len, window_chunks)
    return nearest & farthest & (q_last < q_end) & (k_last < k_end)


def key_span(q_first, q_last, k_end, prefix_len, chunk_len, window_chunks):
    """[lo, hi): keys past the prefix seen by some query in [q_first, q_last]; hi <= lo if none.

    A query past the prefix in chunk c sees keys of chunks max(c - window + 1, 0) .. c, so the
    union over a run of queries is one interval from the first query's oldest chunk to the last
    query's chunk. The result is clipped to `k_end` (exclusive end of the keys).
    """
    q_from = q_first + (prefix_len - q_first) * (prefix_len > q_first)
    oldest = (q_from - prefix_len) // chunk_len - window_chunks + 1
    oldest = oldest * (oldest > 0)
    lo = prefix_len + oldest * chunk_len
    hi = prefix_len + ((q_last - prefix_len) // chunk_len + 1) * chunk_len
    hi = hi + (k_end - hi) * (hi > k_end)
    return lo, lo + (hi - lo) * (q_last >= prefix_len)


def query_span(k_first, k_last, q_end, prefix_len, chunk_len, window_chunks):
    """[lo, hi): queries in [0, q_end) that see some key in [k_first, k_last].

    Every query sees a prefix key; a key past the prefix in chunk c is seen by queries of chunks
    c .. c + window - 1, so a run of keys is seen by one interval of queries.
    """
    in_prefix = k_first < prefix_len
    lo = prefix_len + ((k_first - prefix_len) // chunk_len) * chunk_len
    hi = prefix_len + ((k_last - prefix_len) // chunk_len + window_chunks) * chunk_len
    lo = lo - lo * (in_prefix | (lo < 0))
    hi = hi + (q_end - hi) * (in_prefix | (hi > q_end))
    return lo, hi


def key_tiles(q0, block_m, q_end, k_end, block_n, prefix_len, chunk_len, window_chunks):
    """Key tiles a query tile must visit: prefix tiles [0, n_prefix) and chunk tiles [c0, c1).

    Every other key tile is fully masked and never loaded. The chunk range starts after the
    prefix tiles so that a tile holding both prefix and chunk keys is visited once.
    """
    q_last = q0 + block_m - 1
    q_last = q_last + (q_end - 1 - q_last) * (q_last > q_end - 1)
    prefix_keys = prefix_len + (k_end - prefix_len) * (prefix_len > k_end)
    n_prefix = (prefix_keys + block_n - 1) // block_n
    lo, hi = key_span(q0, q_last, k_end, prefix_len, chunk_len, window_chunks)
    c0 = lo // block_n
    c0 = c0 + (n_prefix - c0) * (n_prefix > c0)
    c1 = (hi + block_n - 1) // block_n
    c1 = c1 + (c0 - c1) * ((hi <= lo) | (c0 > c1))
    return n_prefix, c0, c1


def query_tiles(k0, block_n, q_end, k_end, block_m, prefix_len, chunk_len, window_chunks):
    """[r0, r1): the query tiles that see some key of a key tile."""
    k_last = k0 + block_n - 1
    k_last = k_last + (k_end - 1 - k_last) * (k_last > k_end - 1)
    lo, hi = query_span(k0, k_last, q_end, prefix_len, chunk_len, window_chunks)
    r0 = lo // block_m
    r1 = (hi + block_m - 1) // block_m
    return r0, r1 + (r0 - r1) * ((hi <= lo) | (r0 > r1))


def full_key_run(q0, t_start, t_end, block_m, block_n, k_end, prefix_len, chunk_len, window_chunks):
    """[f0, f1) within key tiles [t_start, t_end): the full tiles, which lie between partial ones.

    Partial tiles sit only at the ends of a range (chunk, window and sequence boundaries), so a
    scan from either end stops after a tile or two. Query rows past the sequence need no bound
    here: the key walk loads them once as zeros and never stores them, so the whole query tile is
    judged by the rule alone. `+ t_end * 0` keeps the loop variable a runtime value when Triton
    is handed a literal start.
    """
    q_end = q0 + block_m
    f0 = t_start + t_end * 0
    while (f0 < t_end) & (tile_full(q0, f0 * block_n, block_m, block_n, q_end, k_end, prefix_len, chunk_len,
                                    window_chunks) == 0):
        f0 += 1
    f1 = t_end + t_start * 0
    while (f1 > f0) & (tile_full(q0, (f1 - 1) * block_n, block_m, block_n, q_end, k_end, prefix_len, chunk_len,
                                 window_chunks) == 0):
        f1 -= 1
    return f0, f1


def full_query_run(k0, t_start, t_end, block_m, block_n, q_end, k_end, prefix_len, chunk_len, window_chunks):
    """[f0, f1) within query tiles [t_start, t_end): the full tiles."""
    f0 = t_start + t_end * 0
    while (f0 < t_end) & (tile_full(f0 * block_m, k0, block_m, block_n, q_end, k_end, prefix_len,
                                    chunk_len, window_chunks) == 0):
        f0 += 1
    f1 = t_end + t_start * 0
    while (f1 > f0) & (tile_full((f1 - 1) * block_m, k0, block_m, block_n, q_end, k_end, prefix_len,
                                 chunk_len, window_chunks) == 0):
        f1 -= 1
    return f0, f1


def resolve_window(window_chunks: int | None, k_len: int, prefix_len: int, chunk_len: int) -> int:
    """The finite window the rule uses: "no window" becomes one chunk more than the keys hold."""
    if window_chunks is not None:
        return window_chunks
    return max(-(-(k_len - prefix_len) // chunk_len), 0) + 1


# ---------------------------------------------------------------------------------------------
# Dense mask and SDPA reference (the CPU path and the ground truth of the kernel tests)


def chunk_causal_mask(q_len: int, k_len: int, *, prefix_len: int, chunk_len: int, window_chunks: int | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean [q_len, k_len] mask of positions 0.. against 0.., True where attention is allowed."""
    window = resolve_window(window_chunks, k_len, prefix_len, chunk_len)
    q_pos = torch.arange(q_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    return visible(q_pos, k_pos, prefix_len, chunk_len, window)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, prefix_len: int, chunk_len: int,
                        window_chunks: int | None = None) -> torch.Tensor:
    """Chunk-causal attention through SDPA with the dense boolean mask; q, k, v are [B, L, H, D]."""
    mask = chunk_causal_mask(q.shape[1], k.shape[1], prefix_len=prefix_len, chunk_len=chunk_len,
                             window_chunks=window_chunks, device=q.device)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)
