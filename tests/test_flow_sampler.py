"""Protects the rectified-flow conventions (noising, shift, x0/velocity, CFG forms) and the Euler sampler (exactness, kept timesteps, determinism)."""

import pytest
import torch
from helpers import make_tiny_wan

from teacher import flow
from teacher.sampler import draw_noise, sample, schedule


def test_noising_and_conversions_are_consistent():
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 2, 2, generator=gen), torch.randn(2, 3, 4, 2, 2, generator=gen)
    t = torch.tensor([250.0, 800.0])
    x_t = flow.add_noise(x0, eps, t)
    assert torch.allclose(x_t[1], 0.2 * x0[1] + 0.8 * eps[1])
    v = flow.velocity_target(x0, eps)
    assert torch.allclose(flow.x0_from_velocity(x_t, v, t), x0, atol=1e-6)
    assert torch.allclose(flow.noise_from_velocity(x_t, v, t), eps, atol=1e-6)
    assert torch.allclose(flow.velocity_from_x0(x_t, x0, t), v, atol=1e-5)
    per_frame = torch.tensor([[0.0, 0.0, 500.0, 1000.0]]).expand(2, 4)
    noisy = flow.add_noise(x0, eps, per_frame)
    assert torch.equal(noisy[:, :, :2], x0[:, :, :2]) and torch.equal(noisy[:, :, 3], eps[:, :, 3])
    with pytest.raises(ValueError, match="needs t > 0"):
        flow.velocity_from_x0(x_t, x0, torch.tensor([0.0, 10.0]))


def test_shift_and_schedule_match_the_documented_numbers():
    shifted = flow.shift_timestep(torch.tensor([1000.0, 750.0, 500.0, 250.0, 0.0]), 5.0)
    assert torch.allclose(shifted, torch.tensor([1000.0, 937.5, 833.3333, 625.0, 0.0]))
    grid = flow.sampling_timesteps(4, 5.0)
    assert torch.allclose(grid.float(), shifted)
    merged = schedule(2, 1.0, keep=[937.5, 500.0])
    assert merged.tolist() == [1000.0, 937.5, 500.0, 0.0]


def test_guidance_conventions():
    cond, uncond = torch.tensor([3.0]), torch.tensor([1.0])
    assert flow.classifier_free_guidance(cond, uncond, 1.0).item() == 3.0
    assert flow.classifier_free_guidance(cond, uncond, 4.0).item() == 9.0
    assert flow.dmd2_guidance(cond, uncond, 3.0).item() == flow.classifier_free_guidance(cond, uncond, 4.0).item()


def test_sampler_is_exact_on_a_point_mass_and_keeps_requested_latents():
    """For data = c the true velocity is (x_t - c)/σ and Euler lands on c exactly."""
    target = torch.full((1, 2, 3, 2, 2), 0.7)
    noise = draw_noise(target.shape, torch.Generator().manual_seed(1))

    def denoiser(x, t, text):
        return (x - target) / flow.sigma(t).view(-1, 1, 1, 1, 1)

    result = sample(denoiser, torch.zeros(1, 1, 1), noise, guidance_scale=1.0, steps=7, shift=3.0,
                    keep_timesteps=[1000.0, 900.0, 333.0])
    assert torch.allclose(result.x0, target, atol=1e-5)
    for i, t in enumerate([1000.0, 900.0, 333.0]):
        assert torch.allclose(result.trajectory[i], flow.add_noise(target, noise, torch.tensor([t])), atol=1e-5)


def test_sampler_applies_ordinary_cfg():
    cond_v, uncond_v = torch.full((1, 1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1, 1), 1.0)

    def denoiser(x, t, text):
        return cond_v if text.item() == 1.0 else uncond_v

    noise = torch.zeros(1, 1, 1, 1, 1)
    out = sample(denoiser, torch.ones(1, 1, 1), noise, negative_text=torch.zeros(1, 1, 1),
                 guidance_scale=3.0, steps=4, shift=5.0)
    assert torch.allclose(out.x0, noise - (1.0 + 3.0 * (2.0 - 1.0)))  # ∫dσ = -1 over constant v


def test_teacher_sampling_is_deterministic_given_the_generator(tmp_path):
    from teacher import NextShotTeacher

    make_tiny_wan(tmp_path)
    teacher = NextShotTeacher.from_pretrained(tmp_path)
    text, negative = torch.randn(1, 5, 24), torch.randn(1, 5, 24)
    context = torch.randn(1, 4, 2, 4, 4)
    context_text = text.unsqueeze(1).expand(-1, 2, -1, -1)

    def denoiser(x, t, txt):
        return teacher(x, t, txt, context=context, context_text=context_text)

    runs = [sample(denoiser, text, draw_noise((1, 4, 2, 4, 4), torch.Generator().manual_seed(seed)),
                   negative_text=negative, guidance_scale=5.0, steps=3, shift=5.0, keep_timesteps=[625.0])
            for seed in (0, 0, 1)]
    assert torch.equal(runs[0].x0, runs[1].x0) and torch.equal(runs[0].trajectory, runs[1].trajectory)
    assert not torch.equal(runs[0].x0, runs[2].x0)
    assert runs[0].trajectory.shape == (1, 1, 4, 2, 4, 4)
