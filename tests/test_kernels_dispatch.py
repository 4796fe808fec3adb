"""Protects the dispatcher: the backend rule (`model.attention`), FlexAttention's mask, and the Triton
kernel's self-check, which must fall back with exactly one warning when the kernel is wrong."""

import os
import warnings

import pytest
import torch

import kernels
from kernels import dispatch

GEOMETRY = dict(prefix_len=5, chunk_len=7, window_chunks=2)


def _qkv(length=40, heads=2, head_dim=16, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, length, heads, head_dim, generator=g).requires_grad_(grad) for _ in range(3)]


@pytest.fixture
def fresh_check(monkeypatch):
    """A dispatcher that has not checked any kernel yet, with the Triton path allowed on CPU."""
    monkeypatch.setattr(dispatch, "_VERIFIED", {})
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_a_wrong_kernel_falls_back_with_one_warning(fresh_check, monkeypatch):
    calls = []

    def wrong(q, k, v, prefix_len, chunk_len, window_chunks):
        calls.append(1)
        return kernels.reference_attention(q, k, v, prefix_len=prefix_len, chunk_len=chunk_len,
                                           window_chunks=window_chunks) * 1.01  # 1% off everywhere

    monkeypatch.setattr(dispatch, "_triton_apply", wrong)
    q, k, v = _qkv(grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [kernels.chunk_causal_attention(q, k, v, **GEOMETRY, backend="triton") for _ in range(3)]
        outs[0].sum().backward()
    ours = [w for w in caught if "self-check" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    message = str(ours[0].message)
    assert ours[0].category is RuntimeWarning
    assert "failed its self-check on cpu" in message and "using 'sdpa' instead" in message
    assert calls, "the self-check never ran the kernel"
    expected = kernels.reference_attention(q, k, v, **GEOMETRY)
    assert all(torch.equal(out, expected) for out in outs)  # every call took the fallback
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_a_kernel_that_raises_falls_back_with_one_warning(fresh_check, monkeypatch):
    def broken(*args):
        raise RuntimeError("out of shared memory\nsecond line")

    monkeypatch.setattr(dispatch, "_triton_apply", broken)
    q, k, v = _qkv()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            kernels.chunk_causal_attention(q, k, v, **GEOMETRY, backend="triton")
    assert [str(w.message).split(": ", 1)[1] for w in caught] == [
        "the Triton kernel failed its self-check on cpu (head dim 16): it raised RuntimeError: out of shared memory; "
        "using 'sdpa' instead"]


def test_a_correct_kernel_is_used_without_a_warning(fresh_check, monkeypatch):
    calls = []

    def right(q, k, v, prefix_len, chunk_len, window_chunks):
        calls.append(q.shape[1])
        return kernels.reference_attention(q, k, v, prefix_len=prefix_len, chunk_len=chunk_len,
                                           window_chunks=window_chunks)

    monkeypatch.setattr(dispatch, "_triton_apply", right)
    q, k, v = _qkv()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.chunk_causal_attention(q, k, v, **GEOMETRY, backend="triton")
        kernels.chunk_causal_attention(q, k, v, **GEOMETRY, backend="triton")
    # the self-check ran the kernel once on its own 72-row problem, then the two calls ran it
    assert calls[-2:] == [40, 40] and calls[0] == 72 and len(calls) == 3


def test_the_self_check_leaves_the_global_rng_alone(fresh_check, monkeypatch):
    monkeypatch.setattr(dispatch, "_triton_apply", lambda q, k, v, *geo: kernels.reference_attention(
        q, k, v, prefix_len=geo[0], chunk_len=geo[1], window_chunks=geo[2]))
    state = torch.get_rng_state()
    assert dispatch.kernel_verified(torch.device("cpu"), 16)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the interpreter set before import")
def test_the_real_kernel_passes_its_self_check_under_the_interpreter():
    pytest.importorskip("triton")
    assert dispatch.self_check(torch.device("cpu"), 32) == (True, "ok")


def test_auto_rule():
    assert dispatch.resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert dispatch.resolve_backend("auto", torch.device("cuda")) == ("triton" if dispatch.prefers_triton() else "flex")
    assert dispatch.MEASURED is None  # no GPU has measured the kernels yet: auto picks FlexAttention on CUDA
    assert dispatch.prefers_triton({"triton_ms": 10.0, "flex_ms": 11.0})       # 10% faster: earns its place
    assert not dispatch.prefers_triton({"triton_ms": 10.0, "flex_ms": 10.9})   # 9% faster: FlexAttention
    assert not dispatch.prefers_triton(None)
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.attention_function("flash")


def test_flex_backend_forward_matches_the_reference_on_cpu():
    q, k, v = _qkv(length=50, seed=1)
    with torch.no_grad():
        out = kernels.chunk_causal_attention(q, k, v, **GEOMETRY, backend="flex")
    assert torch.allclose(out, kernels.reference_attention(q, k, v, **GEOMETRY), atol=1e-5)


def test_dense_attention_is_sdpa_and_the_kernel_agrees(fresh_check):
    q, k, v = _qkv(length=24, seed=2)
    expected = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    for backend in ("auto", "sdpa", "flex"):
        assert torch.equal(kernels.dense_attention(q, k, v, backend), expected)
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert torch.allclose(kernels.attention_function("triton", dense=True)(q, k, v), expected, atol=1e-5)
