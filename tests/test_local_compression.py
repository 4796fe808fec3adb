"""Protects the compressed local memory (student/compression.py, `student.local_compression`): the pooling
rule, the cache against the full-sequence forward (values and gradients, detached, keep_graph and
fixed-shape), a flat and smaller cache, and one-line errors for bad kernels."""

from pathlib import Path

import pytest
import torch

from helpers import TEXT_DIM, make_tiny_wan, stream_chunks
from student import compiled
from student.compression import age, compressed_attention, pool
from student.context import Context
from student.model import CausalStudent
from student.sampling import ChunkStream
from student.settings import StudentSettings
from teacher import NextShotTeacher

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 8  # latent height and width: a 4x4 token grid with the tiny Wan's 2x2 patches


def _student(kernels, local_chunks=3):
    return CausalStudent.from_teacher(NextShotTeacher(make_tiny_wan()), chunk_frames=3, local_chunks=local_chunks,
                                      context_frames=4, local_compression=kernels)


def _inputs(frames=15, seed=0, grad=False):
    """(x, per-frame t, text, context) of 2 rows on 8x8 latents: 5 chunks, a 4-frame two-shot context."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, frames, SIZE, SIZE, generator=gen)
    latents = torch.randn(2, 4, 4, SIZE, SIZE, generator=gen)
    text = torch.randn(2, 5, TEXT_DIM, generator=gen)
    shot_a, shot_b = torch.randn(2, 2, 1, 5, TEXT_DIM, generator=gen)
    texts = torch.cat([shot_a.expand(-1, 2, -1, -1), shot_b.expand(-1, 2, -1, -1)], 1)
    t = torch.rand(2, frames, generator=gen) * 1000
    return x.requires_grad_(grad), t, text, Context(latents, texts, torch.tensor([0, 0, 1, 1]))


def test_pool_averages_each_frames_token_blocks():
    grid = torch.arange(2 * 16, dtype=torch.float32).view(1, 32, 1, 1)  # two frames of a 4x4 grid
    pooled = pool(grid, (4, 4), 2).flatten().tolist()
    assert pooled == [2.5, 4.5, 10.5, 12.5, 18.5, 20.5, 26.5, 28.5]
    assert pool(grid, (4, 4), 4).flatten().tolist() == [7.5, 23.5]
    assert pool(grid, (4, 4), 1) is grid


def test_ageing_pools_on_to_each_ages_kernel():
    """A chunk aged through kernels [1, 2, 4] equals the chunk pooled by each kernel directly; the
    oldest drops out."""
    gen = torch.Generator().manual_seed(0)
    chunks = [torch.randn(2, 3 * 16, 2, 8, generator=gen) for _ in range(4)]
    history = []
    for chunk in chunks:
        history = age(history, chunk, [1, 2, 4], (4, 4))
    assert [h.shape[1] for h in history] == [48, 12, 3]
    for got, chunk, kernel in zip(history, chunks[::-1], [1, 2, 4]):
        torch.testing.assert_close(got, pool(chunk, (4, 4), kernel), atol=1e-6, rtol=0)


def test_compressed_attention_sees_pooled_past_chunks():
    """Against explicit attention: chunk 3 of [1, 2] sees the prefix, chunk 2 whole, chunk 1 pooled
    2x2 (one token per frame of its 2x2 grid), itself, and not chunk 0."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 5 + 4 * 8, 2, 4, generator=gen) for _ in range(3))
    out = compressed_attention(q, k, v, prefix_len=5, chunk_len=8, grid=(2, 2), kernels=[1, 2])
    span = lambda x, i: x[:, 5 + 8 * i:13 + 8 * i]  # noqa: E731
    keys = torch.cat([k[:, :5], span(k, 2), span(k, 1).view(1, 2, 4, 2, 4).mean(2), span(k, 3)], 1)
    values = torch.cat([v[:, :5], span(v, 2), span(v, 1).view(1, 2, 4, 2, 4).mean(2), span(v, 3)], 1)
    weights = torch.einsum("bqhd,bkhd->bhqk", span(q, 3), keys).mul(4 ** -0.5).softmax(-1)
    torch.testing.assert_close(span(out, 3), torch.einsum("bhqk,bkhd->bqhd", weights, values), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernels", [[1, 2, 4], [2, 2, 4]])
@pytest.mark.parametrize("keep_graph", [False, True])
def test_cached_chunks_equal_the_full_sequence(kernels, keep_graph):
    """5 chunks through a 3-chunk compressed local cache (every age, the oldest dropped) equal the
    full-sequence forward that training runs."""
    student = _student(kernels)
    x, t, text, context = _inputs()
    with torch.no_grad():
        full = student(x, t, text, context.latents, context.texts, context.shots)
        cached = stream_chunks(ChunkStream(student, 2, SIZE, SIZE, keep_graph=keep_graph), x, t, text, context)
    assert (full - cached).abs().max().item() <= 1e-5
    plain = CausalStudent(student.transformer, StudentSettings(chunk_frames=3, local_chunks=3, context_frames=4))
    with torch.no_grad():  # the compression changes what the chunks see
        assert (plain(x, t, text, context.latents, context.texts, context.shots) - full).abs().max().item() > 1e-3


def test_cached_gradients_equal_the_full_sequence():
    student = _student([1, 2, 4])
    x, t, text, context = _inputs(grad=True)
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    grads = []
    for cached in (False, True):
        student.zero_grad()
        x.grad = None
        out = stream_chunks(ChunkStream(student, 2, SIZE, SIZE, keep_graph=True), x, t, text, context, grad=True) \
            if cached else student(x, t, text, context.latents, context.texts, context.shots)
        (out * weight).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in student.parameters()])
    for full, cached in zip(*grads):
        assert (full - cached).abs().max().item() <= 1e-5 * max(1.0, full.abs().max().item())


def test_fixed_shape_pass_equals_the_sliced_pass(monkeypatch):
    """The compiled path's fixed-shape pass (run eagerly) over two shots of 5 chunks."""
    monkeypatch.setitem(compiled._COMPILED, compiled.BACKEND, compiled.fixed_chunk_pass)
    student = _student([1, 2, 4])
    x, t, text, context = _inputs()
    with torch.no_grad():
        outs = []
        for mode in ("none", "compile"):
            stream = ChunkStream(student, 2, SIZE, SIZE, compile=mode)
            outs.append([stream_chunks(stream, x, t, text, c) for c in (None, context)])
    for sliced, fixed in zip(*outs):
        torch.testing.assert_close(fixed, sliced, atol=1e-5, rtol=0)


def test_cache_is_flat_and_smaller():
    """The attended keys stop growing once the window is full, at the context plus 3·48/(1 + 4 + 16)
    history tokens plus the chunk, against 3 whole chunks uncompressed; the buffer never moves."""
    student = _student([1, 2, 4])
    stream = ChunkStream(student, 2, SIZE, SIZE)
    plain = ChunkStream(CausalStudent(student.transformer, StudentSettings(chunk_frames=3, local_chunks=3,
                                                                           context_frames=4)), 2, SIZE, SIZE)
    x, t, text, context = _inputs(frames=3)
    pointer, attended = stream.cache.buffer.data_ptr(), []
    with torch.no_grad():
        stream.begin_shot(text, context)
        for _ in range(8):
            attended.append(stream.cache.attended_tokens())
            stream.commit(x, t)
    assert attended == [64 + 48, 64 + 96, 64 + 96 + 12, 64 + 96 + 15] + [64 + 96 + 15] * 4
    assert stream.cache.buffer.data_ptr() == pointer and stream.cache.buffer.shape[3] == 64 + 63 + 48
    assert plain.cache.buffer.shape[3] == 64 + 4 * 48


def test_bad_kernels_fail_in_one_line():
    with pytest.raises(ValueError, match=r"^student local_compression needs one kernel per local chunk \(3, "
                                         r"local_chunks\); got \[1, 2\]$"):
        StudentSettings(local_chunks=3, local_compression=[1, 2]).check()
    with pytest.raises(ValueError, match=r"each dividing the next; got \[2, 3\]$"):
        StudentSettings(local_chunks=2, local_compression=[2, 3]).check()
    student = _student([1, 2, 8])
    with pytest.raises(ValueError, match=r"^student.local_compression kernels \[8\] do not divide the 4x4 token "
                                         r"grid of a latent frame$"):
        ChunkStream(student, 2, SIZE, SIZE)
    x, t, text, context = _inputs()
    with pytest.raises(ValueError, match=r"kernels \[8\] do not divide the 4x4"):
        student(x, t, text, context.latents, context.texts, context.shots)


def test_recipe_key_reaches_the_student_and_its_folder(tmp_path):
    """`student.local_compression` from a recipe builds the student with it, its folder keeps it, and a
    folder saved before the key existed loads uncompressed."""
    from distill.config import load_recipe
    from distill.models import build_student, build_teacher, check_student_keys
    from student.export import save_student
    from student.settings import settings_from_dict

    recipe = Path(__file__).resolve().parents[1] / "recipes/tiny/causal-init.yaml"
    cfg = load_recipe(recipe, ["student.local_compression=[2]"])
    student = build_student(cfg, build_teacher(cfg))
    assert student.settings.local_compression == [2]
    folder = save_student(student, tmp_path / "student", {"codec": {"kind": "patch", "patch": 2}})
    assert CausalStudent.from_pretrained(folder).settings.local_compression == [2]
    saved = student.settings.to_dict()
    del saved["local_compression"]
    assert settings_from_dict(saved, "old.json").local_compression == []
    with pytest.raises(ValueError, match=r"^student local_compression needs one kernel per local chunk \(1, "):
        check_student_keys(load_recipe(recipe, ["student.local_compression=[1,2]"]))
