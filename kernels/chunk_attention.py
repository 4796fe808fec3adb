"""Triton forward and backward kernels for chunk-causal attention on [B, L, H, D] tensors.

Every program walks only the tiles that hold a visible pair (`key_tiles` / `query_tiles`), runs
the full ones unmasked (`full_key_run` / `full_query_run`) and applies the mask rule only on the
partial tiles at chunk, window and sequence boundaries. The mask rule and the tile geometry are
the functions of `kernels.reference`, compiled here with `triton.jit`. Softmax runs in base 2:
scores are scaled by sm_scale * log2(e) and the saved log-sum-exp is in base 2 too.

The backward is deterministic: one kernel accumulates dK and dV per key tile over query tiles,
a second accumulates dQ per query tile over key tiles; nothing is added atomically.
"""

from __future__ import annotations

import math
import types

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels.kernel_config import TileConfig, tile_configs

LOG2E = 1.4426950408889634


def _compile_rules() -> types.SimpleNamespace:
    """`triton.jit` copies of the reference rule functions, linked to each other by name."""
    namespace = {"__name__": __name__, "tl": tl}
    for name in reference.RULE_FUNCTIONS:
        fn = getattr(reference, name)
        namespace[name] = triton.jit(types.FunctionType(fn.__code__, namespace, name, fn.__defaults__))
    return types.SimpleNamespace(**{name: namespace[name] for name in reference.RULE_FUNCTIONS})


_rules = _compile_rules()
visible = _rules.visible
key_tiles = _rules.key_tiles
query_tiles = _rules.query_tiles
full_key_run = _rules.full_key_run
full_query_run = _rules.full_query_run


@triton.jit
def _load_rows(base, rows, stride, n_rows, HEAD_D: tl.constexpr, MASKED: tl.constexpr):
    """A [len(rows), HEAD_D] tile; out-of-range rows read as zero only where MASKED."""
    ptrs = base + rows[:, None] * stride + tl.arange(0, HEAD_D)[None, :]
    if MASKED:
        return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    return tl.load(ptrs)


@triton.jit
def _scores(q, k, q_pos, k_pos, qk_scale, geo_p, geo_c, geo_w, k_len, MASKED: tl.constexpr,
            PRECISION: tl.constexpr):
    """Base-2 scores q k^T, with the mask rule applied only on partial tiles."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        allowed = visible(q_pos[:, None], k_pos[None, :], geo_p, geo_c, geo_w) & (k_pos[None, :] < k_len)
        s = tl.where(allowed, s, float("-inf"))
    return s


# ---------------------------------------------------------------------------------------------
# Forward: one program per (query tile, batch x head), online softmax over the visited key tiles


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, q_pos, k_base, v_base, stride_k, stride_v, t_start, t_end, k_len, qk_scale,
               geo_p, geo_c, geo_w, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, MASKED: tl.constexpr,
               PRECISION: tl.constexpr):
    for t in range(t_start, t_end):
        k_pos = t * BLOCK_N + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, k_pos, stride_k, k_len, HEAD_D, MASKED)
        v = _load_rows(v_base, k_pos, stride_v, k_len, HEAD_D, MASKED)
        s = _scores(q, k, q_pos, k_pos, qk_scale, geo_p, geo_c, geo_w, k_len, MASKED, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_range(acc, m_i, l_i, q, q_pos, q0, k_base, v_base, stride_k, stride_v, t_start, t_end, k_len,
               qk_scale, geo_p, geo_c, geo_w, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
               PRECISION: tl.constexpr):
    """Key tiles [t_start, t_end): partial ones at both ends masked, the full run between unmasked."""
    f0, f1 = full_key_run(q0, t_start, t_end, BLOCK_M, BLOCK_N, k_len, geo_p, geo_c, geo_w)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, q_pos, k_base, v_base, stride_k, stride_v, t_start, f0, k_len,
                               qk_scale, geo_p, geo_c, geo_w, BLOCK_N, HEAD_D, True, PRECISION)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, q_pos, k_base, v_base, stride_k, stride_v, f0, f1, k_len,
                               qk_scale, geo_p, geo_c, geo_w, BLOCK_N, HEAD_D, False, PRECISION)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, q_pos, k_base, v_base, stride_k, stride_v, f1, t_end, k_len,
                               qk_scale, geo_p, geo_c, geo_w, BLOCK_N, HEAD_D, True, PRECISION)
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, sq_b, sq_l, sq_h, sk_b, sk_l, sk_h, sv_b, sv_l, sv_h, so_b, so_l, so_h,
                n_heads, q_len, k_len, geo_p, geo_c, geo_w, qk_scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, PRECISION: tl.constexpr):
    # Later query tiles see more keys; launching them first shortens the tail of the grid.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _load_rows(Q + b * sq_b + h * sq_h, rows, sq_l, q_len, HEAD_D, True)
    q0 = pid_m * BLOCK_M
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    # A finite floor keeps exp2(m_old - m_new) finite while a row has met only masked keys.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    n_prefix, c0, c1 = key_tiles(q0, BLOCK_M, q_len, k_len, BLOCK_N, geo_p, geo_c, geo_w)
    acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, rows, q0, k_base, v_base, sk_l, sv_l, 0, n_prefix, k_len,
                               qk_scale, geo_p, geo_c, geo_w, BLOCK_M, BLOCK_N, HEAD_D, PRECISION)
    acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, rows, q0, k_base, v_base, sk_l, sv_l, c0, c1, k_len,
                               qk_scale, geo_p, geo_c, geo_w, BLOCK_M, BLOCK_N, HEAD_D, PRECISION)
    out = acc / l_i[:, None]
    o_ptrs = O + b * so_b + h * so_h + rows[:, None] * so_l + tl.arange(0, HEAD_D)[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=rows[:, None] < q_len)
    tl.store(LSE + bh.to(tl.int64) * q_len + rows, m_i + tl.math.log2(l_i), mask=rows < q_len)


# ---------------------------------------------------------------------------------------------
# Backward dQ: one program per (query tile, batch x head), the forward's walk over key tiles


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, q_pos, k_base, v_base, stride_k, stride_v, t_start, t_end, k_len, qk_scale,
              geo_p, geo_c, geo_w, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, MASKED: tl.constexpr,
              PRECISION: tl.constexpr):
    for t in range(t_start, t_end):
        k_pos = t * BLOCK_N + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, k_pos, stride_k, k_len, HEAD_D, MASKED)
        v = _load_rows(v_base, k_pos, stride_v, k_len, HEAD_D, MASKED)
        s = _scores(q, k, q_pos, k_pos, qk_scale, geo_p, geo_c, geo_w, k_len, MASKED, PRECISION)
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def _dq_range(dq, q, do, lse, delta, q_pos, q0, k_base, v_base, stride_k, stride_v, t_start, t_end, k_len,
              qk_scale, geo_p, geo_c, geo_w, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
              PRECISION: tl.constexpr):
    f0, f1 = full_key_run(q0, t_start, t_end, BLOCK_M, BLOCK_N, k_len, geo_p, geo_c, geo_w)
    dq = _dq_tiles(dq, q, do, lse, delta, q_pos, k_base, v_base, stride_k, stride_v, t_start, f0, k_len, qk_scale,
                   geo_p, geo_c, geo_w, BLOCK_N, HEAD_D, True, PRECISION)
    dq = _dq_tiles(dq, q, do, lse, delta, q_pos, k_base, v_base, stride_k, stride_v, f0, f1, k_len, qk_scale,
                   geo_p, geo_c, geo_w, BLOCK_N, HEAD_D, False, PRECISION)
    dq = _dq_tiles(dq, q, do, lse, delta, q_pos, k_base, v_base, stride_k, stride_v, f1, t_end, k_len, qk_scale,
                   geo_p, geo_c, geo_w, BLOCK_N, HEAD_D, True, PRECISION)
    return dq


@triton.jit
def _dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, sq_b, sq_l, sq_h, sk_b, sk_l, sk_h, sv_b, sv_l, sv_h,
               sdo_b, sdo_l, sdo_h, sdq_b, sdq_l, sdq_h, n_heads, q_len, k_len, geo_p, geo_c, geo_w,
               qk_scale, sm_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
               PRECISION: tl.constexpr):
    # Later query tiles see more keys; launching them first shortens the tail of the grid.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _load_rows(Q + b * sq_b + h * sq_h, rows, sq_l, q_len, HEAD_D, True)
    do = _load_rows(DO + b * sdo_b + h * sdo_h, rows, sdo_l, q_len, HEAD_D, True)
    lse = tl.load(LSE + bh.to(tl.int64) * q_len + rows, mask=rows < q_len, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * q_len + rows, mask=rows < q_len, other=0.0)
    q0 = pid_m * BLOCK_M
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    dq = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    n_prefix, c0, c1 = key_tiles(q0, BLOCK_M, q_len, k_len, BLOCK_N, geo_p, geo_c, geo_w)
    dq = _dq_range(dq, q, do, lse, delta, rows, q0, k_base, v_base, sk_l, sv_l, 0, n_prefix, k_len,
                   qk_scale, geo_p, geo_c, geo_w, BLOCK_M, BLOCK_N, HEAD_D, PRECISION)
    dq = _dq_range(dq, q, do, lse, delta, rows, q0, k_base, v_base, sk_l, sv_l, c0, c1, k_len,
                   qk_scale, geo_p, geo_c, geo_w, BLOCK_M, BLOCK_N, HEAD_D, PRECISION)
    dq_ptrs = DQ + b * sdq_b + h * sdq_h + rows[:, None] * sdq_l + tl.arange(0, HEAD_D)[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=rows[:, None] < q_len)


# ---------------------------------------------------------------------------------------------
# Backward dK, dV: one program per (key tile, batch x head), walking the query tiles that see it


@triton.jit
def _dkdv_tiles(dk, dv, k, v, k_pos, q_base, do_base, lse_base, delta_base, stride_q, stride_do, t_start, t_end,
                q_len, qk_scale, geo_p, geo_c, geo_w, BLOCK_M: tl.constexpr, HEAD_D: tl.constexpr,
                MASKED: tl.constexpr, PRECISION: tl.constexpr):
    # Scores are kept transposed ([keys, queries]) so that dK and dV come out of plain dots.
    # Query rows past q_len load as zero with lse = delta = 0, which adds exactly zero to dK, dV.
    for t in range(t_start, t_end):
        rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
        q = _load_rows(q_base, rows, stride_q, q_len, HEAD_D, MASKED)
        do = _load_rows(do_base, rows, stride_do, q_len, HEAD_D, MASKED)
        if MASKED:
            lse = tl.load(lse_base + rows, mask=rows < q_len, other=0.0)
            delta = tl.load(delta_base + rows, mask=rows < q_len, other=0.0)
        else:
            lse = tl.load(lse_base + rows)
            delta = tl.load(delta_base + rows)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        if MASKED:
            s_t = tl.where(visible(rows[None, :], k_pos[:, None], geo_p, geo_c, geo_w), s_t, float("-inf"))
        p_t = tl.math.exp2(s_t - lse[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, sq_b, sq_l, sq_h, sk_b, sk_l, sk_h, sv_b, sv_l, sv_h,
                 sdo_b, sdo_l, sdo_h, sdk_b, sdk_l, sdk_h, sdv_b, sdv_l, sdv_h, n_heads, q_len, k_len,
                 geo_p, geo_c, geo_w, qk_scale, sm_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HEAD_D: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    k0 = pid_n * BLOCK_N
    k_pos = k0 + tl.arange(0, BLOCK_N)
    k = _load_rows(K + b * sk_b + h * sk_h, k_pos, sk_l, k_len, HEAD_D, True)
    v = _load_rows(V + b * sv_b + h * sv_h, k_pos, sv_l, k_len, HEAD_D, True)
    q_base = Q + b * sq_b + h * sq_h
    do_base = DO + b * sdo_b + h * sdo_h
    lse_base = LSE + bh.to(tl.int64) * q_len
    delta_base = DELTA + bh.to(tl.int64) * q_len
    dk = tl.zeros([BLOCK_N, HEAD_D], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_D], tl.float32)
    r0, r1 = query_tiles(k0, BLOCK_N, q_len, k_len, BLOCK_M, geo_p, geo_c, geo_w)
    f0, f1 = full_query_run(k0, r0, r1, BLOCK_M, BLOCK_N, q_len, k_len, geo_p, geo_c, geo_w)
    dk, dv = _dkdv_tiles(dk, dv, k, v, k_pos, q_base, do_base, lse_base, delta_base, sq_l, sdo_l, r0, f0, q_len,
                         qk_scale, geo_p, geo_c, geo_w, BLOCK_M, HEAD_D, True, PRECISION)
    dk, dv = _dkdv_tiles(dk, dv, k, v, k_pos, q_base, do_base, lse_base, delta_base, sq_l, sdo_l, f0, f1, q_len,
                         qk_scale, geo_p, geo_c, geo_w, BLOCK_M, HEAD_D, False, PRECISION)
    dk, dv = _dkdv_tiles(dk, dv, k, v, k_pos, q_base, do_base, lse_base, delta_base, sq_l, sdo_l, f1, r1, q_len,
                         qk_scale, geo_p, geo_c, geo_w, BLOCK_M, HEAD_D, True, PRECISION)
    d_cols = tl.arange(0, HEAD_D)[None, :]
    in_bounds = k_pos[:, None] < k_len
    tl.store(DK + b * sdk_b + h * sdk_h + k_pos[:, None] * sdk_l + d_cols, (dk * sm_scale).to(DK.dtype.element_ty),
             mask=in_bounds)
    tl.store(DV + b * sdv_b + h * sdv_h + k_pos[:, None] * sdv_l + d_cols, dv.to(DV.dtype.element_ty),
             mask=in_bounds)


# ---------------------------------------------------------------------------------------------
# Launchers and the autograd Function


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, length, head) strides of a [B, L, H, D] tensor whose last dim is contiguous."""
    return t.stride(0), t.stride(1), t.stride(2)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_args(q: torch.Tensor, k: torch.Tensor, geometry: tuple[int, int, int]) -> dict:
    """Per-launch scalars shared by the three kernels: sizes, mask geometry, scales, dot precision."""
    prefix_len, chunk_len, window = geometry
    sm_scale = 1.0 / math.sqrt(q.shape[-1])
    return dict(n_heads=q.shape[2], q_len=q.shape[1], k_len=k.shape[1], geo_p=prefix_len,
                geo_c=chunk_len, geo_w=window, qk_scale=sm_scale * LOG2E, HEAD_D=q.shape[-1],
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32"), sm_scale


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, geometry: tuple[int, int, int],
                      configs: dict[str, TileConfig] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, L, H, D], base-2 log-sum-exp [B, H, L] fp32); geometry = (prefix_len, chunk_len, window).

    `configs` overrides the tile table (`kernel_config.tile_configs`), for tile sweeps and tests.
    """
    batch, q_len, heads, head_dim = q.shape
    cfg = (configs or tile_configs(head_dim, q.dtype, q.is_cuda))["forward"]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, q_len), dtype=torch.float32, device=q.device)
    args, _ = _launch_args(q, k, geometry)
    grid = (triton.cdiv(q_len, cfg.block_m), batch * heads)
    _fwd_kernel[grid](q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out), **args,
                      BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                       dout: torch.Tensor, geometry: tuple[int, int, int],
                       configs: dict[str, TileConfig] | None = None) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv) from the saved output and log-sum-exp; two kernels, no atomics."""
    batch, q_len, heads, head_dim = q.shape
    cfgs = configs or tile_configs(head_dim, q.dtype, q.is_cuda)
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    args, sm_scale = _launch_args(q, k, geometry)
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(dout))
    cfg = cfgs["dkdv"]
    grid = (triton.cdiv(k.shape[1], cfg.block_n), batch * heads)
    _dkdv_kernel[grid](q, k, v, dout, lse, delta, dk, dv, *common, *_strides(dk), *_strides(dv), **args,
                       sm_scale=sm_scale, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                       num_stages=cfg.num_stages)
    cfg = cfgs["dq"]
    grid = (triton.cdiv(q_len, cfg.block_m), batch * heads)
    _dq_kernel[grid](q, k, v, dout, lse, delta, dq, *common, *_strides(dq), **args, sm_scale=sm_scale,
                     BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dq, dk, dv


class ChunkCausalAttention(torch.autograd.Function):
    """Triton chunk-causal attention; arguments as `kernels.chunk_causal_attention` (checked there)."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_len: int, chunk_len: int, window_chunks: int | None):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        window = reference.resolve_window(window_chunks, k.shape[1], prefix_len, chunk_len)
        geometry = (prefix_len, chunk_len, window)
        out, lse = attention_forward(q, k, v, geometry)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.geometry = geometry
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(q, k, v, out, lse, _last_dim_contiguous(dout), ctx.geometry)
        return dq, dk, dv, None, None, None
