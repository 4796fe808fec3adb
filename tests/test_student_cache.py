"""Protects the student's KV caches: full-sequence parity per frame timestep, no reallocation, the autograd policy, bounded size."""

import pytest
import torch
from helpers import make_tiny_wan, stream_chunks, student_inputs
from student.context import Context

from student.model import CausalStudent
from student.sampling import ChunkStream
from teacher import NextShotTeacher



@pytest.fixture(scope="module")
def student():
    return CausalStudent.from_teacher(NextShotTeacher(make_tiny_wan()), chunk_frames=3, local_chunks=1,
                                      context_frames=4)


def _inputs(frames=12, **kwargs):
    return student_inputs(frames, **kwargs)


def _context(context, context_text):
    """The helpers' context as a Context: two shots, 2 frames then the rest."""
    return Context(context, context_text, torch.tensor([0, 0] + [1] * (context.shape[2] - 2)))


def _stream(stream, x, t, text, context, context_text, commit_grad=False):
    return stream_chunks(stream, x, t, text, _context(context, context_text), commit_grad)


@pytest.mark.parametrize("keep_graph", [False, True])
def test_chunks_through_the_cache_equal_the_full_sequence(student, keep_graph):
    """Per-frame timesteps, a window (local_chunks=1) shorter than the 4-chunk shot, multi-shot context."""
    x, t, text, context, context_text = _inputs()
    with torch.no_grad():
        full = student(x, t, text, context, context_text)
        cached = _stream(ChunkStream(student, 2, 4, 4, keep_graph=keep_graph), x, t, text, context, context_text)
    assert (full - cached).abs().max().item() <= 1e-5


def test_detached_cache_is_written_in_place(student, monkeypatch):
    stream = ChunkStream(student, 2, 4, 4)
    buffer = stream.cache.buffer
    pointer, storage = buffer.data_ptr(), buffer.untyped_storage().data_ptr()
    returned = []
    original = type(stream.cache).write

    def spy(self, kind, layer, k, v):
        out = original(self, kind, layer, k, v)
        returned.append({o.untyped_storage().data_ptr() for o in out})
        return out

    monkeypatch.setattr(type(stream.cache), "write", spy)
    gen = torch.Generator().manual_seed(0)
    x, t, text, context, context_text = _inputs()
    with torch.no_grad():
        for shot in range(2):  # a shot boundary rebuilds the global cache in the same buffer
            stream.begin_shot(text, _context(context, context_text))
            for _ in range(3):
                stream.next_chunk(gen)
                assert stream.cache.attended_tokens() <= buffer.shape[3]
    assert stream.cache.buffer is buffer and buffer.data_ptr() == pointer
    assert len(returned) == 2 * (1 + 3 * 5) * 2 and all(r == {storage} for r in returned)
    assert stream.cache.attended_tokens() == buffer.shape[3]  # context + window: the size is fixed


def test_detached_cache_refuses_gradient(student):
    x, t, text, context, context_text = _inputs()
    stream = ChunkStream(student, 2, 4, 4)
    with torch.no_grad():
        stream.begin_shot(text, _context(context, context_text))
    with pytest.raises(RuntimeError, match=r"^the detached KV cache cannot carry gradient; build it with "
                                           r"keep_graph=True or run the pass under torch.no_grad\(\)$"):
        stream.predict(x[:, :, :3], t[:, :3])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_keep_graph_gradients_equal_the_full_sequence(student, checkpointing):
    """Every pass with gradient: the cached rollout backpropagates exactly like the full forward,
    also when blocks are recomputed in backward after later chunks were committed."""
    x, t, text, context, context_text = _inputs(grad=True)
    weight = torch.randn(2, 4, 12, 4, 4, generator=torch.Generator().manual_seed(1))
    grads = []
    for cached in (False, True):
        student.zero_grad()
        x.grad = None
        student.enable_gradient_checkpointing(checkpointing and cached)
        stream = ChunkStream(student, 2, 4, 4, keep_graph=True)
        out = _stream(stream, x, t, text, context, context_text, commit_grad=True) if cached else \
            student(x, t, text, context, context_text)
        (out * weight).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in student.parameters()])
    student.enable_gradient_checkpointing(False)
    for full, cached in zip(*grads):
        assert (full - cached).abs().max().item() <= 1e-5 * max(1.0, full.abs().max().item())


def test_keep_graph_without_gradient_commit_does_not_leak_into_earlier_chunks(student):
    """Self Forcing: the t = 0 pass runs without gradient, so a chunk's loss reaches only its own input."""
    x, t, text, context, context_text = _inputs(grad=True)
    stream = ChunkStream(student, 2, 4, 4, keep_graph=True)
    out = _stream(stream, x, t, text, context, context_text, commit_grad=False)
    out[:, :, 6:9].square().sum().backward()
    assert x.grad[:, :, :6].abs().max().item() == 0.0 and x.grad[:, :, 9:].abs().max().item() == 0.0
    assert x.grad[:, :, 6:9].abs().max().item() > 0.0


def test_context_larger_than_the_global_cache_is_refused(student):
    x, t, text, context, context_text = _inputs(context_frames=5)
    stream = ChunkStream(student, 2, 4, 4)
    with pytest.raises(ValueError, match=r"^5 context frames exceed the global cache's 4 frames \(context budget\)$"):
        with torch.no_grad():
            stream.begin_shot(text, _context(context, context_text))
