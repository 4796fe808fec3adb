"""Diffusion-DPO (Wallace et al. 2024) in our flow-matching parameterisation, as STAGE aligns its model (§4.2).

A preference pair shares its conditioning c (the target's text and its history): the winner x_w is the
true next shot, the loser x_l a mismatched one. Both are noised with the same timestep t and the same
noise ε (x_t = (1 - σ)x + σε), and each model k (the policy θ, the frozen reference) is scored by its
velocity error on each, err_k(x) = mean over latent elements of ‖v_k(x_t, t, c) - (ε - x)‖². Then

    Δ_w = err_θ(w) - err_ref(w),  Δ_l = err_θ(l) - err_ref(l)
    loss = -log σ(-β (Δ_w - Δ_l)) = softplus(β (Δ_w - Δ_l))

i.e. the policy is pushed to lower its error on the winner, relative to the reference, more than on
the loser (STAGE's -log σ(β(D_θ - D_ref)) with D_k = err_k(l) - err_k(w)). With the policy equal to
the reference the loss is log 2. The error is a per-sample mean, as in the public Diffusion-DPO code,
so β is on its scale (it used β = 2000-5000 for Stable Diffusion). Logged: the implicit reward margin
-β(Δ_w - Δ_l), the implicit accuracy, the fraction of pairs whose margin is positive (ties count 1/2),
and Δ_w and Δ_l themselves: a margin bought by raising the loser's error (Δ_l > 0) while the winner's
also rises (Δ_w > 0) is the known way DPO degrades a model, and shows there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from teacher.flow import add_noise, velocity_target

# (x_t [B, C, F, H, W], t [B]) -> velocity, conditioning bound by the caller
Score = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class DPOLoss:
    loss: torch.Tensor      # mean over pairs, with gradient through the policy
    margin: torch.Tensor    # mean implicit reward margin -β(Δ_w - Δ_l), detached
    accuracy: torch.Tensor  # fraction of pairs with a positive margin (ties 1/2), detached
    winner_gap: torch.Tensor  # mean Δ_w = err_θ(w) - err_ref(w), detached
    loser_gap: torch.Tensor   # mean Δ_l, detached


def velocity_errors(score: Score, winner: torch.Tensor, loser: torch.Tensor, t: torch.Tensor,
                    noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(err(w) [B], err(l) [B]): per-sample mean squared velocity errors, winner and loser in one batch of
    2B (same t, same noise)."""
    x = torch.cat([winner, loser]).float()
    eps = torch.cat([noise, noise]).float()
    tt = torch.cat([t, t])
    err = (score(add_noise(x, eps, tt), tt).float() - velocity_target(x, eps)).pow(2).flatten(1).mean(1)
    return err.chunk(2)


def dpo_loss(policy: Score, reference: Score, winner: torch.Tensor, loser: torch.Tensor, t: torch.Tensor,
             noise: torch.Tensor, beta: float) -> DPOLoss:
    """The Diffusion-DPO loss of pairs (winner, loser) [B, C, F, H, W] at timesteps t [B] with noise ε; the
    reference runs without gradient."""
    if winner.shape != loser.shape:
        raise ValueError(f"winner {list(winner.shape)} and loser {list(loser.shape)} must have one shape")
    err_w, err_l = velocity_errors(policy, winner, loser, t, noise)
    with torch.no_grad():
        ref_w, ref_l = velocity_errors(reference, winner, loser, t, noise)
    gap_w, gap_l = err_w - ref_w, err_l - ref_l
    inside = -beta * (gap_w - gap_l)
    margin = inside.detach()
    accuracy = ((margin > 0).float() + 0.5 * (margin == 0).float()).mean()
    return DPOLoss(F.softplus(-inside).mean(), margin.mean(), accuracy, gap_w.detach().mean(), gap_l.detach().mean())
