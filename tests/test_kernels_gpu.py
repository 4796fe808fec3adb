"""Protects the compiled Triton kernel on a CUDA GPU: bf16 (and fp16/fp32) against a float64 reference."""

import functools
import os

import pytest
import torch

import kernels
from kernels.testing import accuracy_report

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="kernels were decorated for the interpreter"),
]

# FlashAttention's style: at most FACTOR times PyTorch's own error in the same dtype, plus a floor.
FACTOR = 3.0
FLOOR = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}

CASES = {
    # batch, q_len, k_len, heads, head_dim, geometry: sizes no 128/64/32 tile divides
    "training_like": (2, 1131, 1131, 3, 128, dict(prefix_len=150, chunk_len=163)),
    "window": (1, 1000, 1000, 2, 128, dict(prefix_len=97, chunk_len=129, window_chunks=2)),
    "long_prefix": (1, 1300, 1300, 2, 128, dict(prefix_len=326, chunk_len=163)),
    "head_dim_64": (2, 777, 777, 2, 64, dict(prefix_len=0, chunk_len=100, window_chunks=3)),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_gpu_kernel_matches_float64_reference(case, dtype):
    batch, q_len, k_len, heads, head_dim, geometry = CASES[case]
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(batch, q_len, heads, head_dim, device="cuda", generator=g).to(dtype)
    k, v = (torch.randn(batch, k_len, heads, head_dim, device="cuda", generator=g).to(dtype) for _ in range(2))
    dout = torch.randn_like(q)
    triton_fn = functools.partial(kernels.chunk_causal_attention, backend="triton")
    for name, (ours, torch_err) in accuracy_report(triton_fn, q, k, v, dout, geometry).items():
        assert ours <= FACTOR * torch_err + FLOOR[dtype], (name, ours, torch_err)


def test_auto_backend_uses_the_kernel_on_cuda():
    q = torch.randn(1, 300, 2, 64, device="cuda", dtype=torch.bfloat16)
    geometry = dict(prefix_len=40, chunk_len=70)
    auto = kernels.chunk_causal_attention(q, q, q, **geometry)
    assert torch.equal(auto, kernels.chunk_causal_attention(q, q, q, **geometry, backend="triton"))


def test_gpu_backward_is_deterministic():
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(1, 900, 2, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    dout = torch.randn_like(q)
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = kernels.chunk_causal_attention(*leaves, prefix_len=100, chunk_len=160, backend="triton")
        grads.append(torch.autograd.grad(out, leaves, dout))
    assert all(torch.equal(a, b) for a, b in zip(*grads))
