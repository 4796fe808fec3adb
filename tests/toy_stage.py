"""A test-only stage: toy regression with two models, "critic" updated every step and "generator"
every fifth, exercising the trainer the way DMD will (two engines, different update rates).

Fault injection for tests, read only here: SHOTDISTILL_TOY_KILL_AT=<step> SIGKILLs the process
(on rank SHOTDISTILL_TOY_KILL_RANK, default 0) when that step starts; SHOTDISTILL_TOY_SIGNAL_AT=
<step> sends SIGUSR1 (preemption) instead (SHOTDISTILL_TOY_SIGNAL=TERM|INT another signal);
SHOTDISTILL_TOY_RAISE_AT=<step> raises RuntimeError on that rank; SHOTDISTILL_TOY_NAN_AT=<s,s> makes rank 0's losses NaN
at those steps; SHOTDISTILL_TOY_BAD_GRAD_AT=<s,s> keeps the loss finite but its gradient NaN;
SHOTDISTILL_TOY_SPIKE_AT=<s,s> multiplies rank 0's losses by 1e6 at those steps;
SHOTDISTILL_TOY_LR_AT=<step>:<lr> sets every model's peak lr from that step on (a divergence);
SHOTDISTILL_TOY_UNWATCHED=<name,name> trains those models with spikes=False.
"""

from __future__ import annotations

import os
import random
import signal

import numpy as np
import torch

from distill.trainer import TrainedModel, Trainer


class ToyData:
    """Fixed random regression set; the order is a pure function of (seed, epoch, rank, world)."""

    def __init__(self, seed: int, rank: int, world: int, micro_batch: int, size: int = 64):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, 4, generator=g)
        self.y = self.x @ torch.randn(4, 1, generator=g) + 0.5
        self.seed, self.rank, self.world, self.micro_batch = seed, rank, world, micro_batch
        self.epoch, self.pos = 0, 0

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        return torch.randperm(len(self.x), generator=g)[self.rank::self.world].tolist()

    def __next__(self):
        order = self._order()
        if self.pos + self.micro_batch > len(order):
            self.epoch, self.pos = self.epoch + 1, 0
            order = self._order()
        idx = order[self.pos:self.pos + self.micro_batch]
        self.pos += self.micro_batch
        return self.x[idx], self.y[idx]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


class ToyStage:
    folder = "toy"

    def __init__(self, cfg, ctx):
        self.cfg, self.ctx = cfg, ctx
        self.kill_at = int(os.environ.get("SHOTDISTILL_TOY_KILL_AT", "-1"))
        self.kill_rank = int(os.environ.get("SHOTDISTILL_TOY_KILL_RANK", "0"))
        self.signal_at = int(os.environ.get("SHOTDISTILL_TOY_SIGNAL_AT", "-1"))
        self.signal = getattr(signal, "SIG" + os.environ.get("SHOTDISTILL_TOY_SIGNAL", "USR1"))
        self.raise_at = int(os.environ.get("SHOTDISTILL_TOY_RAISE_AT", "-1"))
        nan = os.environ.get("SHOTDISTILL_TOY_NAN_AT", "")
        self.nan_at = {int(s) for s in nan.split(",") if s}
        bad_grad = os.environ.get("SHOTDISTILL_TOY_BAD_GRAD_AT", "")
        self.bad_grad_at = {int(s) for s in bad_grad.split(",") if s}
        spike = os.environ.get("SHOTDISTILL_TOY_SPIKE_AT", "")
        self.spike_at = {int(s) for s in spike.split(",") if s}
        lr_at = os.environ.get("SHOTDISTILL_TOY_LR_AT", "")
        self.lr_at = tuple(float(v) for v in lr_at.split(":")) if lr_at else None

    def run(self) -> dict[str, float]:
        env = self.ctx.env
        unwatched = os.environ.get("SHOTDISTILL_TOY_UNWATCHED", "").split(",")
        models = [TrainedModel("critic", _model(), every=1, spikes="critic" not in unwatched),
                  TrainedModel("generator", _model(), every=5, spikes="generator" not in unwatched)]
        data = ToyData(self.cfg.run.seed, env.rank, env.world_size, self.cfg.train.micro_batch)
        self.trainer = Trainer(self.cfg, self.ctx, models, data, self.step)
        return self.trainer.fit()

    def step(self, batch, due: frozenset, step: int) -> dict[str, torch.Tensor]:
        rank = self.ctx.env.rank
        if step == self.kill_at and rank == self.kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == self.signal_at and rank == self.kill_rank:
            os.kill(os.getpid(), self.signal)
        if step == self.raise_at and rank == self.kill_rank:
            raise RuntimeError(f"toy failure at step {step}")
        if self.lr_at is not None and step >= self.lr_at[0]:
            for warmup in self.trainer.warmup.values():
                warmup.peak = self.lr_at[1]
        x, y = (t.to(self.ctx.env.device) for t in batch)
        # Every RNG the checkpoint restores takes part, so a resume that forgot one diverges.
        jitter = random.random() * 1e-3 + float(np.random.rand()) * 1e-3
        out = {}
        for name in sorted(due):
            target = y + 0.01 * torch.randn_like(y) + jitter
            pred = self.trainer.engines[name](x)
            loss = torch.nn.functional.mse_loss(pred, target)
            if step in self.bad_grad_at and rank == 0:
                loss = loss + torch.sqrt((pred - pred.detach()).pow(2).sum())  # + 0, d/dx = NaN
            if step in self.spike_at and rank == 0:
                loss = loss * 1e6
            out[name] = loss + math_nan() if step in self.nan_at and rank == 0 else loss
        return out


class ToyStageB(ToyStage):
    """The same toy in another folder, so a pipeline can hold two toy stages."""

    folder = "toy-b"


def math_nan() -> float:
    return float("nan")
