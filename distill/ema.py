"""Exponential moving average of a model's trainable parameters (the DMD generator's, the teacher's).

Each rank averages the parameter data it holds: the whole tensor, or under ZeRO-3 its own
partition (`param.ds_tensor`; persistent small parameters are whole), so under ZeRO-3 the EMA
costs one fp32 copy of the trainable weights spread over the ranks, like the weights themselves. The EMA starts as a copy of the weights at the first update
at or after `start` and follows `ema = decay·ema + (1 - decay)·w` at every later update. Its state
is a plain dict of tensors for the trainer's per-rank checkpoint state (restored on resume).
"""

from __future__ import annotations

import torch
from torch import nn


def _local(param: nn.Parameter) -> torch.Tensor:
    """The part of a parameter this rank holds: its ZeRO-3 partition, or the whole tensor (also for
    ZeRO-3 parameters below the persistence threshold, which stay whole and up to date)."""
    if hasattr(param, "ds_tensor") and not getattr(param, "ds_persist", False):
        return param.ds_tensor
    return param.data


class EMA:
    """EMA of `module`'s trainable parameters; `update(step)` after each applied optimizer step."""

    def __init__(self, module: nn.Module, decay: float, start: int) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"an EMA decay must be in [0, 1), got {decay}")
        self.decay, self.start = decay, start
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.shadow: dict[str, torch.Tensor] = {}

    @property
    def enabled(self) -> bool:
        return self.decay > 0

    @torch.no_grad()
    def update(self, step: int) -> None:
        if not self.enabled or step < self.start:
            return
        if not self.shadow:
            self.shadow = {n: _local(p).detach().float().clone() for n, p in self.params.items()}
            return
        for name, p in self.params.items():
            self.shadow[name].mul_(self.decay).add_(_local(p).float(), alpha=1 - self.decay)

    @torch.no_grad()
    def copy_to(self) -> bool:
        """Overwrite the (local parts of the) parameters with the EMA; False when it never started."""
        if not self.shadow:
            return False
        for name, p in self.params.items():
            _local(p).copy_(self.shadow[name].to(_local(p).dtype))
        return True

    def state_dict(self) -> dict:
        return {"shadow": {n: t.cpu() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.params) - set(state["shadow"]) if state["shadow"] else set()
        if missing:
            raise ValueError(f"EMA state lacks {sorted(missing)[:3]} (saved for another model?)")
        device = next(iter(self.params.values())).device if self.params else "cpu"
        self.shadow = {n: t.to(device) for n, t in state["shadow"].items()}
