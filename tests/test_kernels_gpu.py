"""Protects the compiled Triton kernel on a CUDA GPU: bf16 (and fp16/fp32) against a float64 reference."""

import os

import pytest
import torch

import kernels
from kernels.testing import GPU_CASES, accuracy_report, tolerance

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="kernels were decorated for the interpreter"),
]

# FlashAttention's style: at most kernels.testing.FACTOR times PyTorch's own error in the same dtype,
# plus a floor (kernels.testing.tolerance).
CASES = GPU_CASES


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_gpu_kernel_matches_float64_reference(case, dtype):
    batch, q_len, k_len, heads, head_dim, geometry = CASES[case]
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(batch, q_len, heads, head_dim, device="cuda", generator=g).to(dtype)
    k, v = (torch.randn(batch, k_len, heads, head_dim, device="cuda", generator=g).to(dtype) for _ in range(2))
    dout = torch.randn_like(q)
    for name, (ours, torch_err) in accuracy_report(kernels.triton_attention, q, k, v, dout, geometry).items():
        assert ours <= tolerance(torch_err, dtype), (name, ours, torch_err)


def test_kernel_passes_its_self_check_on_cuda():
    from kernels.dispatch import self_check

    for head_dim in (64, 128):
        assert self_check(torch.device("cuda"), head_dim) == (True, "ok")


def test_auto_backend_follows_the_measured_rule_on_cuda():
    from kernels.dispatch import MEASURED, prefers_triton

    q = torch.randn(1, 300, 2, 64, device="cuda", dtype=torch.bfloat16)
    geometry = dict(prefix_len=40, chunk_len=70)
    auto = kernels.chunk_causal_attention(q, q, q, **geometry)
    chosen = "triton" if prefers_triton(MEASURED) else "flex"
    assert torch.equal(auto, kernels.chunk_causal_attention(q, q, q, **geometry, backend=chosen))


def test_gpu_backward_is_deterministic():
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(1, 900, 2, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    dout = torch.randn_like(q)
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = kernels.triton_attention(*leaves, prefix_len=100, chunk_len=160)
        grads.append(torch.autograd.grad(out, leaves, dout))
    assert all(torch.equal(a, b) for a, b in zip(*grads))
