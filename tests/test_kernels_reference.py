"""Protects the chunk-causal mask rule, the tile geometry derived from it, and the SDPA reference path."""

import random

import pytest
import torch

import kernels
from kernels.reference import full_key_run, full_query_run, key_tiles, query_tiles, resolve_window, visible


def _rule_by_definition(i: int, j: int, p: int, c: int, w: int | None) -> bool:
    """DESIGN.md's sentence, spelled out independently of the vectorised rule."""
    if j < p:
        return True
    if i < p:
        return False
    ci, cj = (i - p) // c, (j - p) // c
    return cj <= ci and (w is None or ci - cj < w)


@pytest.mark.parametrize("p,c,w,lq,lk", [(0, 3, None, 10, 10), (4, 5, None, 23, 23), (3, 4, 2, 20, 20),
                                          (5, 2, 1, 15, 15), (5, 2, 1, 16, 13)])
def test_mask_matches_the_written_definition(p, c, w, lq, lk):
    mask = kernels.chunk_causal_mask(lq, lk, prefix_len=p, chunk_len=c, window_chunks=w)
    expected = torch.tensor([[_rule_by_definition(r, j, p, c, w) for j in range(lk)] for r in range(lq)])
    assert torch.equal(mask, expected)


def test_mask_small_example():
    # prefix 2, chunks of 3: rows are positions 0..7
    mask = kernels.chunk_causal_mask(8, 8, prefix_len=2, chunk_len=3).int()
    assert mask.tolist() == [[1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0],
                             [1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0],
                             [1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]]


def _tile_geometry(rng: random.Random) -> dict:
    length = rng.randint(1, 90)
    return dict(lk=length, lq=length, p=rng.choice([0, rng.randint(0, length + 8)]),
                c=rng.randint(1, 20), w=rng.choice([None, rng.randint(1, 4)]),
                bm=rng.choice([16, 32]), bn=rng.choice([16, 32]))


def _visited_key_tiles(q0: int, g: dict, w: int) -> tuple[set, set]:
    """(visited, unmasked) key tiles of one query tile, as the forward and dQ kernels walk them."""
    args = (g["bm"], g["bn"], g["lk"], g["p"], g["c"], w)
    n_prefix, c0, c1 = key_tiles(q0, g["bm"], g["lq"], g["lk"], g["bn"], g["p"], g["c"], w)
    visited, unmasked = set(), set()
    for start, end in ((0, n_prefix), (c0, c1)):
        f0, f1 = full_key_run(q0, start, end, *args)
        visited |= set(range(start, end))
        unmasked |= set(range(f0, f1))
    return visited, unmasked


def _visited_query_tiles(k0: int, g: dict, w: int) -> tuple[set, set]:
    """(visited, unmasked) query tiles of one key tile, as the dK/dV kernel walks them."""
    r0, r1 = query_tiles(k0, g["bn"], g["lq"], g["lk"], g["bm"], g["p"], g["c"], w)
    f0, f1 = full_query_run(k0, r0, r1, g["bm"], g["bn"], g["lq"], g["lk"], g["p"], g["c"], w)
    return set(range(r0, r1)), set(range(f0, f1))


def test_tile_classifier_agrees_with_dense_mask():
    """On random geometries the kernels visit exactly the tiles holding a visible pair and run
    unmasked exactly on in-bounds tiles whose every pair is visible, in both loop orders."""
    rng = random.Random(0)
    for _ in range(600):
        g = _tile_geometry(rng)
        w = resolve_window(g["w"], g["lk"], g["p"], g["c"])
        mask = kernels.chunk_causal_mask(g["lq"], g["lk"], prefix_len=g["p"], chunk_len=g["c"], window_chunks=g["w"])
        n_q, n_k = -(-g["lq"] // g["bm"]), -(-g["lk"] // g["bn"])
        # the key walk judges whole query tiles, rows past the end included (they are never stored)
        padded = kernels.chunk_causal_mask(n_q * g["bm"], g["lk"], prefix_len=g["p"], chunk_len=g["c"],
                                           window_chunks=g["w"])

        def block(m, t, rows=mask):
            return rows[m * g["bm"]:(m + 1) * g["bm"], t * g["bn"]:(t + 1) * g["bn"]]
        keys_in = [(t + 1) * g["bn"] <= g["lk"] for t in range(n_k)]
        rows_in = [(m + 1) * g["bm"] <= g["lq"] for m in range(n_q)]
        for m in range(n_q):
            visited, unmasked = _visited_key_tiles(m * g["bm"], g, w)
            assert visited == {t for t in range(n_k) if block(m, t).any()}, (g, m)
            assert unmasked == {t for t in range(n_k) if keys_in[t] and block(m, t, padded).all()}, (g, m)
        for t in range(n_k):
            visited, unmasked = _visited_query_tiles(t * g["bn"], g, w)
            assert visited == {m for m in range(n_q) if block(m, t).any()}, (g, t)
            assert unmasked == {m for m in range(n_q) if rows_in[m] and keys_in[t] and block(m, t).all()}, (g, t)


def test_visible_on_python_ints_and_tensors_agree():
    i, j = torch.meshgrid(torch.arange(30), torch.arange(30), indexing="ij")
    dense = visible(i, j, 4, 7, 2)
    assert all(bool(dense[a, b]) == bool(visible(a, b, 4, 7, 2)) for a in range(30) for b in range(30))


def test_reference_matches_explicit_softmax():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 13, 3, 8, generator=g, dtype=torch.float64) for _ in range(3))
    out = kernels.reference_attention(q, k, v, prefix_len=3, chunk_len=4, window_chunks=2)
    mask = kernels.chunk_causal_mask(13, 13, prefix_len=3, chunk_len=4, window_chunks=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / 8 ** 0.5
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    assert torch.allclose(out, torch.einsum("bhqk,bkhd->bqhd", weights, v), atol=1e-12)


def test_sdpa_backend_is_differentiable():
    q, k, v = (torch.randn(1, 10, 2, 4, requires_grad=True) for _ in range(3))
    kernels.chunk_causal_attention(q, k, v, prefix_len=2, chunk_len=3, backend="sdpa").square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))


@pytest.mark.parametrize("kwargs,message", [
    (dict(chunk_len=0), "chunk_causal_attention: chunk_len must be >= 1, got 0"),
    (dict(prefix_len=-1), "chunk_causal_attention: prefix_len must be >= 0, got -1"),
    (dict(window_chunks=0), "chunk_causal_attention: window_chunks must be None or >= 1, got 0"),
    (dict(k=torch.zeros(1, 12, 2, 4)), "chunk_causal_attention: q (1, 10, 2, 4) and k (1, 12, 2, 4) differ in shape"),
    (dict(v=torch.zeros(1, 10, 2, 8)), "chunk_causal_attention: q (1, 10, 2, 4) and v (1, 10, 2, 8) differ in shape"),
    (dict(backend="flash"), "chunk_causal_attention: backend must be one of ('auto', 'triton', 'flex', 'sdpa'), "
                            "got 'flash'"),
])
def test_bad_arguments_name_the_argument(kwargs, message):
    q = torch.randn(1, 10, 2, 4)
    args = dict(k=q, v=q, prefix_len=2, chunk_len=3) | kwargs
    with pytest.raises(ValueError) as err:
        kernels.chunk_causal_attention(q, **args)
    assert str(err.value) == message


def test_importing_kernels_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, kernels; assert 'triton' not in sys.modules, 'triton imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)
