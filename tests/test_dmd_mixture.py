"""DMD proven where the answer is known: a one-step generator distilled from an analytic 2-D Gaussian mixture.

The real score is the mixture's exact flow-matching velocity, so what the generator should learn is
known in closed form; the critic and the generator are small MLPs trained with our own
`generator_loss` / `critic_loss` (distill/dmd.py). A sign-flipped run must fail the same criteria,
and DMD2 guidance against a conditional mixture must move mass the way its convention predicts.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from distill.dmd import critic_loss, draw_timesteps, generator_loss

# Well separated (>= 2.5 apart, std 0.15), so nearest-mode assignment is unambiguous for the target.
A, B, S = [-1.5, -1.0], [1.5, -1.0], [0.0, 1.5]
STD = 0.15

STEPS = 1000  # generator steps; the critic takes CRITIC_STEPS per generator step (DMD2 alternation)
CRITIC_STEPS = 2
BATCH = 256
LR = 3e-3
# The analytic velocity divides by σ; t >= 20 keeps it finite and the critic's targets bounded.
MIN_T, MAX_T = 20.0, 980.0
SAMPLES = 8192

MASS_TOL = 0.1
# measured over seeds 0-4: mass error <= 0.024, mean error <= 0.05, cov error <= 0.09, near >= 0.79
MEAN_TOL = 0.15  # L2 distance of the sample mean from the mixture's
COV_TOL = 0.3  # largest entry of |cov - cov_target|
# fraction within 4 std of some mode: 1 - e^-8 for the mixture itself; guards against a blurry
# generator that gets masses and moments right by smearing points between the modes
NEAR_MIN = 0.7


@dataclass(frozen=True)
class Mixture:
    """An isotropic 2-D Gaussian mixture and its exact velocity under x_t = (1 - σ)·x0 + σ·ε."""

    means: torch.Tensor  # [K, 2] float64
    weights: torch.Tensor  # [K] float64, summing to 1
    std: float

    @classmethod
    def of(cls, means: list, weights: list, std: float = STD) -> Mixture:
        return cls(torch.tensor(means, dtype=torch.float64), torch.tensor(weights, dtype=torch.float64), std)

    def posterior_x0(self, x_t: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
        """E[x0 | x_t] for x_t [B, 2], σ [B, 1]: responsibilities times per-component Gaussian conditioning."""
        keep, s2 = 1 - sig, self.std ** 2
        var = keep * keep * s2 + sig * sig  # x_t | k ~ N((1 - σ)·μ_k, var·I)
        diff = x_t[:, None] - keep[:, :, None] * self.means  # [B, K, 2]
        # 2-D isotropic: log N = -|d|²/(2 var) - log var + const
        logits = self.weights.log() - 0.5 * diff.pow(2).sum(-1) / var - var.log()
        x0_k = self.means + (keep * s2 / var)[:, :, None] * diff
        return (logits.softmax(-1)[:, :, None] * x0_k).sum(1)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The Score callable: x_t [B, 2, 1, 1, 1] -> v = (x_t - E[x0 | x_t]) / σ, in float64 inside."""
        x = x_t.reshape(-1, 2).double()
        sig = (t.double() / 1000).view(-1, 1)
        return ((x - self.posterior_x0(x, sig)) / sig).view_as(x_t).to(x_t.dtype)

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=gen)
        return self.means[k] + self.std * torch.randn(n, 2, generator=gen, dtype=torch.float64)

    def mean(self) -> torch.Tensor:
        return self.weights @ self.means

    def cov(self) -> torch.Tensor:
        second = (self.weights[:, None, None] * self.means[:, :, None] * self.means[:, None, :]).sum(0)
        mu = self.mean()
        return second - torch.outer(mu, mu) + self.std ** 2 * torch.eye(2, dtype=torch.float64)


def _mlp(inputs: int, width: int = 64) -> nn.Module:
    return nn.Sequential(nn.Linear(inputs, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                         nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))


def _as_latent(points: torch.Tensor) -> torch.Tensor:
    """2-D points as the [B, C, F, H, W] samples the DMD losses expect (C = 2, F = H = W = 1)."""
    return points.view(-1, 2, 1, 1, 1)


def _critic_score(net: nn.Module):
    return lambda x_t, t: net(torch.cat([x_t.reshape(-1, 2), (t / 1000).view(-1, 1)], 1)).view_as(x_t)


def distill(real: Mixture, seed: int, real_uncond: Mixture | None = None, guidance: float = 0.0,
            flipped: bool = False) -> torch.Tensor:
    """Trains a one-step generator against `real` with DMD and returns SAMPLES fresh points [N, 2].

    `flipped` swaps the real and fake scores inside generator_loss only (the critic still learns the
    generator), which negates the DMD direction: the generator climbs away from the data.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        generator, critic = _mlp(2), _mlp(3)
        fake = _critic_score(critic)
        opts = [torch.optim.Adam(m.parameters(), LR, betas=(0.0, 0.99), foreach=True)
                for m in (generator, critic)]
        # decaying to zero settles the last iterate; the adversarial pair otherwise keeps jittering
        scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda i: 1 - i / STEPS) for o in opts]
        for _ in range(STEPS):
            for _ in range(CRITIC_STEPS):
                _step(opts[1], critic_loss(fake, _as_latent(_generate(generator, gen).detach()),
                                           *_draw(gen)))
            first, second = (fake, real.velocity) if flipped else (real.velocity, fake)
            uncond = real_uncond.velocity if real_uncond is not None else None
            out = generator_loss(_as_latent(_generate(generator, gen)), first, second, *_draw(gen),
                                 real_uncond=uncond, guidance=guidance)
            _step(opts[0], out.loss)
            for sched in scheds:
                sched.step()
        with torch.no_grad():
            return _generate(generator, gen, SAMPLES).double()


def _generate(generator: nn.Module, gen: torch.Generator, n: int | None = None) -> torch.Tensor:
    return generator(torch.randn(n or BATCH, 2, generator=gen))


def _draw(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps [B] and noise for one DMD/critic evaluation."""
    return draw_timesteps(BATCH, 1.0, MIN_T, MAX_T, generator=gen), _as_latent(torch.randn(BATCH, 2, generator=gen))


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    opt.zero_grad()
    loss.backward()
    opt.step()


@dataclass(frozen=True)
class Fit:
    """How samples compare with a mixture; every error is NaN-safe (a NaN fails `ok`)."""

    mass: list[float]  # fraction whose nearest mode is k
    mass_err: float
    mean_err: float
    cov_err: float
    near: float

    @property
    def ok(self) -> bool:
        return bool(self.mass_err <= MASS_TOL and self.mean_err <= MEAN_TOL and self.cov_err <= COV_TOL
                    and self.near >= NEAR_MIN)


def measure(x: torch.Tensor, target: Mixture, modes: torch.Tensor | None = None) -> Fit:
    """Compares samples x [N, 2] with `target`; `modes` (default: target's) are the modes masses are counted on."""
    modes = target.means if modes is None else modes
    dist, nearest = torch.cdist(x, modes).min(1)
    mass = torch.bincount(nearest, minlength=len(modes)).double() / len(x)
    weights = mass.new_zeros(len(modes))
    weights[torch.cdist(target.means, modes).argmin(1)] = target.weights
    return Fit(mass=mass.tolist(), mass_err=(mass - weights).abs().max().item(),
               mean_err=(x.mean(0) - target.mean()).norm().item(),
               cov_err=(torch.cov(x.T) - target.cov()).abs().max().item(),
               near=(dist < 4 * target.std).double().mean().item())


UNEQUAL = Mixture.of([A, B, S], [0.5, 0.3, 0.2])


def _flow_matching_residual_moments(score: Mixture, data: Mixture, t: float, n: int = 200_000) -> torch.Tensor:
    """E[(v(x_t) - (ε - x0))·h(x_t)] for h in (1, x_t) on data from `data` [2, 3]."""
    gen = torch.Generator().manual_seed(int(t))
    x0, eps = data.sample(n, gen), torch.randn(n, 2, generator=gen, dtype=torch.float64)
    sig = t / 1000
    x_t = (1 - sig) * x0 + sig * eps
    v = score.velocity(_as_latent(x_t), torch.full((n,), t, dtype=torch.float64)).view(n, 2)
    features = torch.cat([torch.ones(n, 1, dtype=torch.float64), x_t], 1)
    return ((v - (eps - x0))[:, :, None] * features[:, None, :]).mean(0)


@pytest.mark.parametrize("t", [300.0, 600.0, 900.0])
def test_analytic_velocity_is_the_flow_matching_optimum(t):
    """The known answer must be right: v(x_t) = E[ε - x0 | x_t] makes the residual orthogonal to
    every function of x_t (measured <= 0.008 at n = 200k; the standard error is ~0.005)."""
    assert _flow_matching_residual_moments(UNEQUAL, UNEQUAL, t).abs().max() < 0.03


def test_residual_check_sees_wrong_weights():
    """At high noise the posterior is dominated by the weights: equal weights leave a 0.37 moment."""
    equal = Mixture.of([A, B, S], [1 / 3, 1 / 3, 1 / 3])
    assert _flow_matching_residual_moments(equal, UNEQUAL, 900.0).abs().max() > 0.1


@pytest.mark.parametrize("seed", [0, 1])
def test_dmd_recovers_an_unequal_mixture(one_thread, seed):
    fit = measure(distill(UNEQUAL, seed), UNEQUAL)
    assert min(fit.mass) > 0.1, f"a mode was dropped: {fit}"
    assert fit.ok, fit


def test_flipped_dmd_gradient_fails_the_same_criteria(one_thread):
    """Guards against vacuous criteria: ascending the DMD objective must not pass them."""
    fit = measure(distill(UNEQUAL, 0, flipped=True), UNEQUAL)
    assert not fit.ok, fit
    # not a near miss: the samples leave the data altogether (written so that NaN counts as leaving)
    assert not fit.near >= 0.5 and not fit.mean_err <= 1.0, fit


def test_guidance_moves_mass_to_the_class_only_mode(one_thread):
    """Class 0 = {A, S} and class 1 = {B, S}, equal weights; unconditional = their average.

    The velocity is affine in the score with σ-only coefficients, v = -(x_t + σ·∇log p_t)/(1 - σ),
    and DMD2's `cond + g·(cond - uncond)` has weights summing to 1, so the guided real velocity is
    that of the score ∇log(p_0^(1+g) / p_u^g). Near t = 0 that density, on well separated identical
    modes, is p_0 reweighted by (p_0 / p_u)^g = 2^g on A and 1 on S: mass on A is 2^g / (1 + 2^g),
    0.8 at g = 2 against 0.5 at g = 0, and none on B (the other class's mode). DMD matches the
    guided score at every noise level, where it is not the diffusion of that one density, so the
    measured A mass falls short of 0.8 (0.72-0.74 over 3 seeds); the bounds keep the direction and
    rule out both no effect and a collapse onto A.
    """
    cond = Mixture.of([A, S], [0.5, 0.5])
    uncond = Mixture.of([A, B, S], [0.25, 0.25, 0.5])
    plain = measure(distill(cond, 0, real_uncond=uncond, guidance=0.0), cond, uncond.means)
    guided_x = distill(cond, 0, real_uncond=uncond, guidance=2.0)
    guided = measure(guided_x, cond, uncond.means)
    assert plain.ok, plain
    assert 0.65 < guided.mass[0] < 0.9 and guided.mass[0] > plain.mass[0] + 0.15, (plain, guided)
    assert guided.mass[1] < 0.02, guided
    # the whole distribution is pushed away from the unconditional mean (0.75 from it at g = 0)
    assert (guided_x.mean(0) - uncond.mean()).norm() > (cond.mean() - uncond.mean()).norm() + 0.3
