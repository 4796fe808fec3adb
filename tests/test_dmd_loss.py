"""Protects the DMD losses (distill/dmd.py): hand-computed values, the DMD2 guidance convention, where gradient goes."""

from __future__ import annotations

import pytest
import torch

from distill.dmd import critic_loss, dmd_gradient, dmd_surrogate, draw_timesteps, generator_loss, guided_x0
from teacher.flow import classifier_free_guidance


def _const(value: float):
    return lambda x_t, t: torch.full_like(x_t, value)


def test_timesteps_are_shifted_then_clamped():
    gen = torch.Generator().manual_seed(3)
    u = torch.rand(6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t = draw_timesteps(6, 5.0, 20.0, 980.0, generator=gen)
    expected = (5 * u / (1 + 4 * u) * 1000).clamp(20, 980)
    assert t.dtype == torch.float32
    torch.testing.assert_close(t.double(), expected, rtol=0, atol=1e-4)
    # u = 0.5 at shift 5 is 833.3; a clamp range that excludes it pins every draw to its bounds
    assert draw_timesteps(4, 5.0, 990.0, 1000.0).min() >= 990.0
    assert draw_timesteps(4, 1.0, 0.0, 10.0).max() <= 10.0
    with pytest.raises(ValueError, match=r"min_t <= max_t"):
        draw_timesteps(1, 5.0, 980.0, 20.0)


def test_guidance_is_dmd2_convention():
    """g = 3 in `cond + g·(cond - uncond)` is ordinary CFG with scale 4; g = 0 is the conditional score."""
    x_t, t = torch.full((1, 1, 1, 1, 1), 2.0), torch.tensor([500.0])
    cond, uncond = torch.full_like(x_t, 1.0), torch.full_like(x_t, 0.5)
    # v = 1 + 3·(1 - 0.5) = 2.5; x0 = 2 - 0.5·2.5 = 0.75
    assert guided_x0(x_t, t, cond, uncond, 3.0).item() == pytest.approx(0.75)
    cfg4 = classifier_free_guidance(cond, uncond, 4.0)
    assert guided_x0(x_t, t, cond, uncond, 3.0).item() == pytest.approx((x_t - 0.5 * cfg4).item())
    assert guided_x0(x_t, t, cond, uncond, 0.0).item() == pytest.approx(1.5)


def test_dmd_gradient_is_normalised_per_sample_and_finite():
    x = torch.tensor([[2.0, 2.0], [0.0, 4.0]]).view(2, 1, 2, 1, 1)
    x0_real = torch.tensor([[1.0, 1.0], [0.0, 2.0]]).view(2, 1, 2, 1, 1)
    x0_fake = torch.tensor([[2.0, 3.0], [1.0, 1.0]]).view(2, 1, 2, 1, 1)
    grad = dmd_gradient(x, x0_real, x0_fake)
    # sample 0: mean|x - real| = 1 -> [1, 2]; sample 1: mean|x - real| = (0 + 2)/2 = 1 -> [1, -1]
    assert grad.dtype == torch.float64
    assert grad.flatten(1).tolist() == [[1.0, 2.0], [1.0, -1.0]]
    same = dmd_gradient(x, x, x0_fake)  # 0 / 0 and c / 0 are zeroed, not propagated
    assert same.abs().max().item() == 0.0


def test_surrogate_value_and_gradient():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    grad = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    loss = dmd_surrogate(x, grad)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(0.5 * (0.25 + 1 + 4 + 0) / 4)
    loss.backward()
    torch.testing.assert_close(x.grad, (grad / 4).float())


def test_generator_loss_hand_example():
    """x = [2, 6], ε = 1, t = 500: x_t = [1.5, 3.5]; real v = 1, fake v = -1 -> x0_real = x_t - 0.5,
    x0_fake = x_t + 0.5, grad = 1 / |x - x0_real| = [1/1, 1/3]."""
    x = torch.tensor([2.0, 6.0]).view(2, 1, 1, 1, 1).requires_grad_(True)
    noise, t = torch.ones_like(x), torch.tensor([500.0, 500.0])
    out = generator_loss(x, _const(1.0), _const(-1.0), t, noise)
    assert out.loss.item() == pytest.approx(0.5 * (1.0 + 1 / 9) / 2)
    assert out.grad_norm.item() == pytest.approx((1.0 + 1 / 3) / 2)
    out.loss.backward()
    torch.testing.assert_close(x.grad.flatten(), torch.tensor([1.0, 1 / 3]) / 2)
    guided = generator_loss(x.detach(), _const(1.0), _const(-1.0), t, noise, real_uncond=_const(0.0),
                            guidance=1.0)
    # v_real = 1 + 1·(1 - 0) = 2 -> x0_real = x_t - 1 = [0.5, 2.5], x0_fake = [2, 4];
    # grad = 1.5 / |x - x0_real| = [1.5 / 1.5, 1.5 / 3.5]
    assert guided.grad_norm.item() == pytest.approx((1 + 3 / 7) / 2)
    with pytest.raises(ValueError, match="needs the unconditional real score"):
        generator_loss(x, _const(1.0), _const(-1.0), t, noise, guidance=3.0)


def test_scores_get_no_gradient_from_either_loss():
    torch.manual_seed(0)
    real, fake, gen = (torch.nn.Linear(1, 1) for _ in range(3))
    as_score = lambda m: (lambda x_t, t: m(x_t.unsqueeze(-1)).squeeze(-1))  # noqa: E731
    x = gen(torch.randn(2, 1, 3, 2, 2, 1)).squeeze(-1)
    noise, t = torch.randn_like(x), torch.tensor([300.0, 700.0])
    generator_loss(x, as_score(real), as_score(fake), t, noise).loss.backward()
    assert gen.weight.grad is not None
    assert real.weight.grad is None and fake.weight.grad is None
    gen.zero_grad()
    critic_loss(as_score(fake), x, t, noise).backward()
    assert fake.weight.grad is not None and gen.weight.grad is None


def test_critic_loss_is_flow_matching():
    x = torch.full((1, 1, 2, 1, 1), 2.0)
    noise = torch.tensor([1.0, -1.0]).view(1, 1, 2, 1, 1)
    # target v = ε - x = [-1, -3]; a critic predicting 0 scores mean(1, 9) = 5
    assert critic_loss(_const(0.0), x, torch.tensor([250.0]), noise).item() == pytest.approx(5.0)
