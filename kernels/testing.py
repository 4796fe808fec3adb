"""Accuracy against a float64 ground truth, shared by the kernel tests and the GPU benchmark.

FlashAttention's convention: a kernel is accurate when its error against the float64 reference
is at most a few times the error of the same computation done by PyTorch in the kernel's dtype.
"""

from __future__ import annotations

from typing import Callable

import torch

from kernels.reference import reference_attention

NAMES = ("out", "dq", "dk", "dv")

# A kernel's error may be at most FACTOR times PyTorch's own error in the same dtype, plus a floor
# for entries where PyTorch happens to be almost exact (FlashAttention's test style). Shared by the
# GPU tests, the Triton self-check (kernels/dispatch.py) and benchmarks/gpu.py.
FACTOR = 3.0
FLOOR = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}

# The GPU correctness cases: batch, q_len, k_len, heads, head_dim, geometry; sizes no 128/64/32
# tile divides (tests/test_kernels_gpu.py, benchmarks/gpu.py).
GPU_CASES = {
    "training_like": (2, 1131, 1131, 3, 128, dict(prefix_len=150, chunk_len=163)),
    "window": (1, 1000, 1000, 2, 128, dict(prefix_len=97, chunk_len=129, window_chunks=2)),
    "long_prefix": (1, 1300, 1300, 2, 128, dict(prefix_len=326, chunk_len=163)),
    "head_dim_64": (2, 777, 777, 2, 64, dict(prefix_len=0, chunk_len=100, window_chunks=3)),
}


def tolerance(torch_error: float, dtype: torch.dtype) -> float:
    """The largest error a kernel in `dtype` may show where PyTorch's own error is `torch_error`."""
    return FACTOR * torch_error + FLOOR[dtype]


def outputs_and_grads(fn: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      dout: torch.Tensor, geometry: dict) -> dict[str, torch.Tensor]:
    """{"out", "dq", "dk", "dv"} of `fn(q, k, v, **geometry)` backpropagating `dout`."""
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v, **geometry)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))
    return dict(zip(NAMES, (out.detach(), dq, dk, dv)))


def max_errors(fn: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               dout: torch.Tensor, geometry: dict) -> dict[str, float]:
    """Max absolute error of fn's output and three gradients against the float64 reference."""
    truth = outputs_and_grads(reference_attention, *(t.double() for t in (q, k, v, dout)), geometry)
    got = outputs_and_grads(fn, q, k, v, dout, geometry)
    return {name: (got[name].double() - truth[name]).abs().max().item() for name in NAMES}


def accuracy_report(fn: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    dout: torch.Tensor, geometry: dict) -> dict[str, tuple[float, float]]:
    """{name: (error of fn, error of the same-dtype PyTorch reference)}, both against float64."""
    ours = max_errors(fn, q, k, v, dout, geometry)
    torch_same_dtype = max_errors(reference_attention, q, k, v, dout, geometry)
    return {name: (ours[name], torch_same_dtype[name]) for name in NAMES}
