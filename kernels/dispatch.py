"""`chunk_causal_attention`: argument checks and the choice of backend, with the Triton kernel's self-check.

Backends (the recipe key `model.attention`):

- "sdpa": PyTorch SDPA with the dense boolean mask (`kernels.reference`); every device, the CPU
  reference and ground truth.
- "flex": FlexAttention (compiled on CUDA) with a block mask built from the same rule; on CPU it
  runs forward only (FlexAttention has no CPU backward).
- "triton": our Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1), self-checked on first use.
- "auto": "sdpa" off CUDA; on CUDA FlexAttention, unless the Triton kernel was measured on a GPU at
  least `TRITON_MARGIN` (10%) faster forward+backward at the training shape (`MEASURED`, written
  from `benchmarks/gpu.py`'s output). FlexAttention is the default because it is maintained
  upstream, compiles the same mask rule and its block-sparse tiles already skip the 43% of masked
  tiles the chunk mask leaves; a kernel of our own only earns its place by measured speed.

Self-check: the first time the Triton kernel would run on a device (per head dim), a small problem
goes through it and through the float64 reference, forward and backward (bf16 on CUDA, fp32 under
the CPU interpreter, whose bf16 dot is wrong), within `kernels.testing`'s tolerance. If it fails
or raises, one warning says so and every later call on that device falls back (flex on CUDA, sdpa
elsewhere): nobody trains on a wrong kernel. `triton_attention` is the unchecked kernel (tests,
benchmarks).
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from kernels.reference import reference_attention, resolve_window, visible

BACKENDS = ("auto", "triton", "flex", "sdpa")
TRITON_HEAD_DIMS = (16, 32, 64, 128)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The `auto` rule's GPU evidence: forward+backward milliseconds of both kernels at the training
# shape (benchmarks/gpu.py prints this dict after a GPU run), or None while not measured.
MEASURED: dict | None = None  # not measured: no GPU has run benchmarks/gpu.py yet
TRITON_MARGIN = 1.10  # Triton must be at least 10% faster (flex time / triton time >= 1.10)


def prefers_triton(measured: dict | None = MEASURED) -> bool:
    """The `auto` rule on CUDA: Triton only when measured at least TRITON_MARGIN faster than flex."""
    if not measured:
        return False
    return measured["flex_ms"] >= TRITON_MARGIN * measured["triton_ms"]


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


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend `backend` runs as on `device` ("auto" resolved; a failed Triton self-check is
    not consulted here)."""
    if backend not in BACKENDS:
        raise ValueError(f"chunk_causal_attention: backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if torch.device(device).type != "cuda":
        return "sdpa"
    return "triton" if prefers_triton(MEASURED) else "flex"


def chunk_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, prefix_len: int, chunk_len: int,
                           window_chunks: int | None = None, backend: str = "auto") -> torch.Tensor:
    """Attention of q over k, v, all [B, L, H, D] (query i is key position i), under the chunk-causal mask.

    backend: one of BACKENDS (module doc). Differentiable in q, k and v on every backend but flex
    on CPU.
    """
    if backend not in BACKENDS:
        raise ValueError(f"chunk_causal_attention: backend must be one of {BACKENDS}, got {backend!r}")
    check_inputs(q, k, v, prefix_len, chunk_len, window_chunks)
    geometry = dict(prefix_len=prefix_len, chunk_len=chunk_len, window_chunks=window_chunks)
    chosen = resolve_backend(backend, q.device)
    if q.numel() == 0:  # an empty launch grid is the reference's business
        chosen = "sdpa"
    if chosen == "triton":
        _require_triton(q)
        if not kernel_verified(q.device, q.shape[-1]):
            chosen = fallback_backend(q.device)
    if chosen == "triton":
        return _run_kernel(q, k, v, **geometry)
    if chosen == "flex":
        return flex_attention(q, k, v, **geometry)
    return reference_attention(q, k, v, **geometry)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Bidirectional attention on [B, L, H, D] (the teacher's). Every key is visible, so "auto",
    "sdpa" and "flex" run mask-free SDPA (FlashAttention on CUDA, which a mask-free FlexAttention
    cannot beat); "triton" runs the self-checked kernel with the whole sequence as its prefix."""
    chosen = resolve_backend(backend, q.device)
    if chosen == "triton" and q.shape == k.shape and q.numel():
        return chunk_causal_attention(q, k, v, prefix_len=k.shape[1], chunk_len=1, backend="triton")
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def attention_function(backend: str, dense: bool = False) -> Callable[..., torch.Tensor]:
    """`backend` bound into the chunk-causal (or, `dense`, the bidirectional) attention function."""
    resolve_backend(backend, torch.device("cpu"))  # validates the name
    fn = dense_attention if dense else chunk_causal_attention
    return functools.partial(fn, backend=backend)


# ---------------------------------------------------------------------------------------------
# Triton: the unchecked kernel and its self-check


def _require_triton(q: torch.Tensor) -> None:
    if not triton_supported(q):
        raise ValueError(f"chunk_causal_attention: backend='triton' needs CUDA or TRITON_INTERPRET=1, head dim in "
                         f"{TRITON_HEAD_DIMS} and dtype in fp16/bf16/fp32; got {q.device}, D={q.shape[-1]}, {q.dtype}")


def _triton_apply(q, k, v, prefix_len: int, chunk_len: int, window_chunks: int | None) -> torch.Tensor:
    from kernels.chunk_attention import ChunkCausalAttention  # lazy: importing triton is slow and CUDA-only

    return ChunkCausalAttention.apply(q, k, v, prefix_len, chunk_len, window_chunks)


def _run_kernel(q, k, v, *, prefix_len: int, chunk_len: int, window_chunks: int | None = None) -> torch.Tensor:
    """The kernel call every path goes through (a test replaces `_triton_apply` to fake a wrong kernel)."""
    return _triton_apply(q, k, v, prefix_len, chunk_len, window_chunks)


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, prefix_len: int, chunk_len: int,
                     window_chunks: int | None = None) -> torch.Tensor:
    """The Triton kernel without the self-check (kernel tests and benchmarks measure it as it is)."""
    check_inputs(q, k, v, prefix_len, chunk_len, window_chunks)
    _require_triton(q)
    if q.numel() == 0:
        return reference_attention(q, k, v, prefix_len=prefix_len, chunk_len=chunk_len, window_chunks=window_chunks)
    return _run_kernel(q, k, v, prefix_len=prefix_len, chunk_len=chunk_len, window_chunks=window_chunks)


# (device, head dim) -> whether the kernel passed its self-check there
_VERIFIED: dict[tuple[str, int], bool] = {}


def _device_key(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def fallback_backend(device: torch.device) -> str:
    """What runs instead of a kernel that failed its self-check: flex on CUDA, sdpa elsewhere."""
    return "flex" if torch.device(device).type == "cuda" and _has_flex() else "sdpa"


def self_check(device: torch.device, head_dim: int, kernel: Callable[..., torch.Tensor] | None = None
               ) -> tuple[bool, str]:
    """(passed, one-line reason) of `kernel` (default: the Triton kernel) on a small problem whose
    tiles are full, partial and skipped, forward and backward against the float64 reference."""
    from kernels.testing import accuracy_report, tolerance

    device = torch.device(device)
    on_cuda = device.type == "cuda"
    dtype = torch.bfloat16 if on_cuda else torch.float32  # the interpreter's bf16 dot is wrong
    # CUDA tiles are 128 x 64 / 32 x 128: 700 rows span several; interpreter tiles are 16 x 16.
    length, geometry = (700, dict(prefix_len=100, chunk_len=150, window_chunks=3)) if on_cuda else \
        (72, dict(prefix_len=10, chunk_len=13, window_chunks=3))
    g = torch.Generator().manual_seed(0)  # its own generator: the caller's RNG streams stay untouched
    q, k, v, dout = (torch.randn(1, length, 2, head_dim, generator=g).to(device, dtype) for _ in range(4))
    fn = kernel or _run_kernel
    try:
        with torch.enable_grad():
            report = accuracy_report(fn, q, k, v, dout, geometry)
    except Exception as e:  # noqa: BLE001 - a kernel that cannot run is a failed check, not a crash
        return False, f"it raised {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    for name, (ours, torch_err) in report.items():
        limit = tolerance(torch_err, dtype)
        if not ours <= limit:  # NaN fails too
            return False, f"{name} error {ours:.3g} > tolerance {limit:.3g} ({dtype})"
    return True, "ok"


def kernel_verified(device: torch.device, head_dim: int) -> bool:
    """Whether the Triton kernel passed its self-check on `device` at `head_dim` (run once, on first use;
    a failure warns once and is remembered)."""
    key = (_device_key(device), int(head_dim))
    if key not in _VERIFIED:
        passed, reason = self_check(torch.device(key[0]), head_dim)
        _VERIFIED[key] = passed
        if not passed:
            warnings.warn(f"chunk_causal_attention: the Triton kernel failed its self-check on {key[0]} "
                          f"(head dim {head_dim}): {reason}; using {fallback_backend(device)!r} instead",
                          RuntimeWarning, stacklevel=3)
    return _VERIFIED[key]


# ---------------------------------------------------------------------------------------------
# FlexAttention


@functools.cache
def _has_flex() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def chunk_mask_mod(prefix_len: int, chunk_len: int, window: int):
    """FlexAttention's mask_mod of the chunk-causal rule: the same `visible` function, on its index tensors."""
    def mask_mod(b, h, q_idx, kv_idx):
        return visible(q_idx, kv_idx, prefix_len, chunk_len, window)
    return mask_mod


@functools.lru_cache(maxsize=32)
def flex_block_mask(q_len: int, k_len: int, prefix_len: int, chunk_len: int, window: int, device: str):
    """FlexAttention's block mask of the chunk-causal rule, cached per shape."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(chunk_mask_mod(prefix_len, chunk_len, window), None, None, q_len, k_len, device=device)


@functools.cache
def _flex_fn(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention as flex

    return torch.compile(flex, dynamic=False) if compiled else flex


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, prefix_len: int, chunk_len: int,
                   window_chunks: int | None = None) -> torch.Tensor:
    """FlexAttention under the chunk-causal block mask (compiled on CUDA; eager, forward only, on CPU)."""
    window = resolve_window(window_chunks, k.shape[1], prefix_len, chunk_len)
    mask = flex_block_mask(q.shape[1], k.shape[1], prefix_len, chunk_len, window, _device_key(q.device))
    with warnings.catch_warnings():  # eager flex on CPU warns that it is unfused: that is known here
        warnings.simplefilter("ignore", UserWarning)
        out = _flex_fn(q.is_cuda)(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask)
    return out.transpose(1, 2)
