"""`chunk_causal_attention`: argument checks and the choice between the Triton kernel and the reference."""

from __future__ import annotations

import os

import torch

from kernels.reference import reference_attention

BACKENDS = ("auto", "triton", "reference")
TRITON_HEAD_DIMS = (16, 32, 64, 128)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int, chunk_len: int,
                 window_chunks: int | None) -> None:
    """Raise ValueError naming the first argument that breaks the [B, L, H, D] chunk-causal contract."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"chunk_causal_attention: {name} must be [B, L, H, D], got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"chunk_causal_attention: q {tuple(q.shape)} and {name} {tuple(t.shape)} differ in shape")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"chunk_causal_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if chunk_len < 1:
        raise ValueError(f"chunk_causal_attention: chunk_len must be >= 1, got {chunk_len}")
    if prefix_len < 0:
        raise ValueError(f"chunk_causal_attention: prefix_len must be >= 0, got {prefix_len}")
    if window_chunks is not None and window_chunks < 1:
        raise ValueError(f"chunk_causal_attention: window_chunks must be None or >= 1, got {window_chunks}")


def triton_supported(q: torch.Tensor) -> bool:
    """Whether the Triton kernel handles this head dim and dtype on this device (or the interpreter)."""
    runnable = q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return runnable and q.shape[-1] in TRITON_HEAD_DIMS and q.dtype in TRITON_DTYPES


def chunk_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, prefix_len: int, chunk_len: int,
                           window_chunks: int | None = None, backend: str = "auto") -> torch.Tensor:
    """Attention of q over k, v, all [B, L, H, D] (query i is key position i), under the chunk-causal mask.

    backend: "triton" runs the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1), "reference"
    the SDPA path with a dense boolean mask, "auto" the kernel on CUDA when the head dim and dtype
    are supported and the reference otherwise. Differentiable in q, k and v on every backend.
    """
    if backend not in BACKENDS:
        raise ValueError(f"chunk_causal_attention: backend must be one of {BACKENDS}, got {backend!r}")
    check_inputs(q, k, v, prefix_len, chunk_len, window_chunks)
    use_triton = backend == "triton" or (backend == "auto" and q.is_cuda and triton_supported(q))
    if not use_triton or q.numel() == 0:  # an empty launch grid is the reference's business
        return reference_attention(q, k, v, prefix_len=prefix_len, chunk_len=chunk_len, window_chunks=window_chunks)
    if not triton_supported(q):
        raise ValueError(f"chunk_causal_attention: backend='triton' needs CUDA or TRITON_INTERPRET=1, head dim in "
                         f"{TRITON_HEAD_DIMS} and dtype in fp16/bf16/fp32; got {q.device}, D={q.shape[-1]}, {q.dtype}")
    from kernels.chunk_attention import ChunkCausalAttention  # lazy: importing triton is slow and CUDA-only

    return ChunkCausalAttention.apply(q, k, v, prefix_len, chunk_len, window_chunks)
