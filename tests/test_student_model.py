"""Protects CausalStudent's full-sequence forward: teacher parity on one chunk, chunk causality, the window, indicators, errors."""

import pytest
import torch
from helpers import make_tiny_wan, student_inputs

from student.model import CausalStudent
from teacher import NextShotTeacher



@pytest.fixture(scope="module")
def teacher():
    return NextShotTeacher(make_tiny_wan())


def _inputs(frames=9, **kwargs):
    return student_inputs(frames, **kwargs)


def test_one_chunk_without_context_is_the_teacher(teacher):
    student = CausalStudent.from_teacher(teacher, chunk_frames=3)
    x, t, text, _, _ = _inputs(frames=3)
    with torch.no_grad():
        for timestep in (t[:, 0], t[:, :1].expand(-1, 3)):
            assert (student(x, timestep, text) - teacher(x, timestep, text)).abs().max().item() <= 1e-5
    assert {n for n, _ in student.named_parameters()} == {n for n, _ in teacher.named_parameters()}


def test_context_is_a_prefix_and_chunks_are_causal(teacher):
    student = CausalStudent.from_teacher(teacher, chunk_frames=3)
    x, t, text, context, context_text = _inputs()
    later = x.clone()
    later[:, :, 6:] += 1.0  # change only the last chunk
    with torch.no_grad():
        base = student(x, t, text, context, context_text)
        changed = student(later, t, text, context, context_text)
        other_context = student(x, t, text, context + 1.0, context_text)
    assert torch.equal(base[:, :, :6], changed[:, :, :6])
    assert (base[:, :, 6:] - changed[:, :, 6:]).abs().max().item() > 1e-3
    assert (base[:, :, :3] - other_context[:, :, :3]).abs().max().item() > 1e-3


def test_window_hides_chunks_older_than_local_chunks(teacher):
    """Each layer looks back local_chunks chunks, so a 2-layer model's chunk 3 cannot see chunk 0."""
    student = CausalStudent.from_teacher(teacher, chunk_frames=3, local_chunks=1)
    assert student.settings.window_chunks == 2
    x, t, text, context, context_text = _inputs(frames=12)
    first = x.clone()
    first[:, :, :3] += 1.0
    with torch.no_grad():
        base = student(x, t, text, context, context_text)
        changed = student(first, t, text, context, context_text)
        unwindowed = student(first, t, text, context, context_text, window_chunks=None)
    assert torch.equal(base[:, :, 9:], changed[:, :, 9:])
    assert (base[:, :, 6:9] - changed[:, :, 6:9]).abs().max().item() > 1e-3
    assert (base[:, :, 9:] - unwindowed[:, :, 9:]).abs().max().item() > 1e-3


def test_indicators(teacher):
    x, t, text, context, context_text = _inputs()
    sequential = NextShotTeacher(teacher.transformer, positions="sequential")
    learnable = CausalStudent.from_teacher(sequential, indicator="learnable")
    none = CausalStudent.from_teacher(sequential)
    offset = CausalStudent.from_teacher(teacher)
    assert none.settings.indicator == "none" and offset.settings.indicator == "rope_offset"
    assert learnable.shot_indicator is not None and offset.shot_indicator is None
    with torch.no_grad():
        zero_init = learnable(x, t, text, context, context_text)
        assert torch.equal(zero_init, none(x, t, text, context, context_text))
        assert (zero_init - offset(x, t, text, context, context_text)).abs().max().item() > 1e-4
        learnable.shot_indicator.normal_()
        assert (zero_init - learnable(x, t, text, context, context_text)).abs().max().item() > 1e-3
        assert torch.equal(none(x, t, text), learnable(x, t, text))  # no cut before the first shot
    with pytest.raises(ValueError, match=r"student indicator 'rope_offset' needs teacher positions 'shot_rope'; "
                                         r"the teacher uses 'sequential'"):
        CausalStudent.from_teacher(sequential, indicator="rope_offset")


def test_errors(teacher):
    student = CausalStudent.from_teacher(teacher, chunk_frames=3)
    x, t, text, context, context_text = _inputs(frames=5)
    with pytest.raises(ValueError, match=r"^noisy has 5 latent frames, not a whole number of 3-frame chunks "
                                         r"\(chunk_frames\)$"):
        student(x, t, text, context, context_text)
    with pytest.raises(ValueError, match=r"student indicator must be one of \['rope_offset', 'learnable', 'none'\]; "
                                         r"got 'rope'"):
        CausalStudent.from_teacher(teacher, indicator="rope")
    with pytest.raises(ValueError, match=r"student denoising_steps must be descending"):
        CausalStudent.from_teacher(teacher, denoising_steps=[250, 1000])
