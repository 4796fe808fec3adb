"""Protects the Triton chunk-attention kernel (run by the interpreter on CPU) against a float64 reference."""

import os

import pytest
import torch

import kernels
from kernels.testing import accuracy_report

pytest.importorskip("triton")

# Error against float64 may be at most FACTOR times that of PyTorch in the same dtype, plus a
# floor for entries where PyTorch happens to be almost exact (FlashAttention's test style).
FACTOR = 3.0
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3}


# TRITON_INTERPRET is read when kernels (triton's own included) are decorated, i.e. at import;
# tests/conftest.py sets it before anything imports triton on machines without CUDA.
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="interpreter tests need TRITON_INTERPRET=1 before triton is imported")


def _inputs(batch, q_len, k_len, heads, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_len, heads, head_dim, generator=g).to(dtype)
    k, v = (torch.randn(batch, k_len, heads, head_dim, generator=g).to(dtype) for _ in range(2))
    dout = torch.randn(batch, q_len, heads, head_dim, generator=g).to(dtype)
    return q, k, v, dout


def _check(q, k, v, dout, **geometry):
    report = accuracy_report(kernels.triton_attention, q, k, v, dout, geometry)
    for name, (ours, torch_err) in report.items():
        assert ours <= FACTOR * torch_err + FLOOR[q.dtype], (name, ours, torch_err, geometry)


CASES = {
    # batch, q_len, k_len, heads, head_dim, geometry: lengths and chunks that no 16-row tile divides
    "no_prefix": (1, 77, 77, 2, 64, dict(prefix_len=0, chunk_len=13)),
    "prefix_and_window": (1, 62, 62, 2, 64, dict(prefix_len=10, chunk_len=9, window_chunks=2)),
    "long_prefix_one_chunk": (1, 50, 50, 2, 64, dict(prefix_len=30, chunk_len=40)),
    "batch_and_window_3": (2, 70, 70, 2, 64, dict(prefix_len=12, chunk_len=10, window_chunks=3)),
    "head_dim_128": (1, 40, 40, 2, 128, dict(prefix_len=6, chunk_len=11)),
    "head_dim_128_window": (1, 45, 45, 1, 128, dict(prefix_len=5, chunk_len=8, window_chunks=2)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_float64_reference(case, dtype):
    batch, q_len, k_len, heads, head_dim, geometry = CASES[case]
    q, k, v, dout = _inputs(batch, q_len, k_len, heads, head_dim, dtype)
    _check(q, k, v, dout, **geometry)


def test_strided_inputs_from_a_packed_projection():
    """q, k, v as views into one [B, L, H, 3D] tensor (how a fused qkv projection hands them over)."""
    g = torch.Generator().manual_seed(1)
    packed = torch.randn(1, 45, 2, 3 * 64, generator=g)
    q, k, v = packed.split(64, dim=-1)
    dout = torch.randn(1, 45, 2, 64, generator=g)
    _check(q, k, v, dout, prefix_len=7, chunk_len=12, window_chunks=2)


def test_backward_is_deterministic():
    q, k, v, dout = _inputs(1, 50, 50, 2, 32, torch.float32, seed=3)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = kernels.triton_attention(*leaves, prefix_len=9, chunk_len=10)
        runs.append(torch.autograd.grad(out, leaves, dout))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_triton_backend_rejects_unsupported_head_dim():
    q = torch.randn(1, 8, 1, 24)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA or TRITON_INTERPRET=1, head dim in"):
        kernels.chunk_causal_attention(q, q, q, prefix_len=2, chunk_len=3, backend="triton")



def test_cases_exercise_skipped_masked_and_unmasked_tiles():
    """The interpreter cases above are only meaningful if every kind of tile occurs in them."""
    from kernels.kernel_config import tile_configs
    from kernels.reference import full_key_run, key_tiles, resolve_window

    tile = tile_configs(64, torch.float32, on_cuda=False)["forward"]
    kinds = set()
    for batch, q_len, k_len, heads, head_dim, geometry in CASES.values():
        p, c = geometry["prefix_len"], geometry["chunk_len"]
        w = resolve_window(geometry.get("window_chunks"), k_len, p, c)
        n_k = -(-k_len // tile.block_n)
        for q0 in range(0, q_len, tile.block_m):
            n_prefix, c0, c1 = key_tiles(q0, tile.block_m, q_len, k_len, tile.block_n, p, c, w)
            visited = (c1 - c0) + n_prefix
            kinds |= {"skipped"} if visited < n_k else set()
            for start, end in ((0, n_prefix), (c0, c1)):
                f0, f1 = full_key_run(q0, start, end, tile.block_m, tile.block_n, k_len, p, c, w)
                kinds |= ({"unmasked"} if f1 > f0 else set()) | ({"masked"} if (f0 - start) + (end - f1) else set())
    assert kinds == {"skipped", "masked", "unmasked"}


def test_unequal_tile_shapes_match_the_reference():
    """On a GPU the tiles are unequal (128x64, 32x128, 128x32); the same mix at interpreter size."""
    from kernels.chunk_attention import attention_backward, attention_forward
    from kernels.kernel_config import TileConfig
    from kernels.reference import resolve_window

    configs = {"forward": TileConfig(32, 16, 1, 1), "dkdv": TileConfig(16, 32, 1, 1), "dq": TileConfig(32, 16, 1, 1)}
    q, k, v, dout = (t.double() for t in _inputs(1, 83, 83, 2, 16, torch.float32, seed=5))
    geometry = dict(prefix_len=11, chunk_len=9, window_chunks=3)
    launch = (11, 9, resolve_window(3, 83, 11, 9))
    out, lse = attention_forward(q.float(), k.float(), v.float(), launch, configs)
    grads = attention_backward(q.float(), k.float(), v.float(), out, lse, dout.float(), launch, configs)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    expected = kernels.reference_attention(*leaves, **geometry)
    expected_grads = torch.autograd.grad(expected, leaves, dout)
    for got, want in zip((out, *grads), (expected, *expected_grads)):
        assert torch.allclose(got.double(), want, atol=1e-5), (got.double() - want).abs().max()


def test_auto_backend_on_cpu_is_the_reference_even_under_the_interpreter():
    q, k, v, _ = _inputs(1, 30, 30, 2, 64, torch.float32)
    geometry = dict(prefix_len=4, chunk_len=9)
    auto = kernels.chunk_causal_attention(q, k, v, **geometry)
    assert torch.equal(auto, kernels.reference_attention(q, k, v, **geometry))
