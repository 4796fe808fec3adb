"""Protects few-step chunk sampling: the shifted schedule, exit steps, and cached generation equal to full-sequence generation across shots."""

import pytest
import torch
from helpers import make_tiny_wan

from student.model import CausalStudent
from student.sampling import ChunkStream, denoise_chunk, denoising_timesteps, latent_context
from teacher import NextShotTeacher
from teacher.sampler import draw_noise

TEXT_DIM = 24  # tests/helpers.tiny_wan_config text_dim


def test_default_schedule_is_warped_through_the_shift():
    steps = denoising_timesteps([1000, 750, 500, 250], shift=5.0)
    assert steps == pytest.approx([1000.0, 937.5, 2500 / 3, 625.0], abs=1e-9)


def test_exit_step_returns_that_steps_x0_with_gradient_only_there():
    weight = torch.tensor(0.5, requires_grad=True)
    seen = []

    def predict(x, t):
        seen.append(torch.is_grad_enabled())
        return x * weight + t.view(-1, 1, 1, 1, 1) / 1000

    noise = torch.randn(2, 1, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    steps = denoising_timesteps([1000, 750, 500, 250], 5.0)
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    with torch.no_grad():
        full_x0s = []
        denoise_chunk(lambda x, t: full_x0s.append(x.clone()) or predict(x, t), noise, steps, gen_a)
    seen.clear()
    x0 = denoise_chunk(predict, noise, steps, gen_b, exit_step=2)
    assert seen == [False, False, True] and x0.requires_grad
    sig = steps[2] / 1000
    expected = full_x0s[2] - sig * (full_x0s[2] * 0.5 + steps[2] / 1000)
    assert torch.allclose(x0.detach(), expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"exit_step 4 is outside the 4 denoising steps"):
        denoise_chunk(predict, noise, steps, gen_b, exit_step=4)


def _full_sequence_shot(student, text, context, context_text, context_shots, chunks, gen):
    """The same sampling, each chunk predicted by the full-sequence forward over the finished chunks."""
    batch, frames = text.shape[0], student.settings.chunk_frames
    steps = denoising_timesteps(student.settings.denoising_steps, student.settings.shift)
    done = []
    for _ in range(chunks):
        def predict(x, t):
            latents = torch.cat(done + [x], dim=2)
            timesteps = torch.cat([t.new_zeros(batch, len(done) * frames), t[:, None].expand(batch, frames)], 1)
            return student(latents, timesteps, text, context, context_text, context_shots)[:, :, -frames:]
        noise = draw_noise((batch, 4, frames, 4, 4), gen)
        done.append(denoise_chunk(predict, noise, steps, gen))
    return torch.cat(done, dim=2)


@pytest.mark.parametrize("indicator,keep_graph", [("rope_offset", False), ("learnable", True), ("none", False)])
def test_cached_generation_equals_full_sequence_generation_across_shots(indicator, keep_graph):
    """Three shots of 3 chunks with local_chunks=1: global cache rebuilt from all finished shots at each
    boundary (dynamic rule, budget 4), local cache cleared, window shorter than the shot."""
    positions = "shot_rope" if indicator == "rope_offset" else "sequential"
    teacher = NextShotTeacher(make_tiny_wan(), positions=positions)
    student = CausalStudent.from_teacher(teacher, indicator=indicator, local_chunks=1, context_frames=4)
    if student.shot_indicator is not None:
        with torch.no_grad():
            student.shot_indicator.normal_()
    texts = torch.randn(3, 2, 5, TEXT_DIM, generator=torch.Generator().manual_seed(3))
    stream = ChunkStream(student, batch=2, height=4, width=4, keep_graph=keep_graph)
    gen_stream, gen_full = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    shots, references = [], []
    with torch.no_grad():
        for k in range(3):
            stream.begin_shot_after(texts[k], shots, texts[:k])
            context = latent_context(shots, texts[:k], "dynamic", budget=4)
            context, context_text, context_shots = (None, None, None) if context is None else \
                (context.latents, context.texts, context.shots)
            shots.append(torch.cat([stream.next_chunk(gen_stream) for _ in range(3)], dim=2))
            references.append(_full_sequence_shot(student, texts[k], context, context_text, context_shots, 3,
                                                  gen_full))
    assert context_shots[0].tolist() == [0, 0, 1, 1]
    for ours, reference in zip(shots, references):
        assert (ours - reference).abs().max().item() <= 1e-5
    assert (shots[1] - shots[2]).abs().max().item() > 1e-2
