"""An endless, resumable stream of micro-batches: each rank a disjoint share, order fixed by the seed.

Epoch e's batches are a pure function of (seed, e, rank, world size): the items are permuted with a
generator seeded by the stream ("data-order", e) of the seed; walking that permutation, each item
joins the open batch of its group (`dataset.group(i)`, e.g. its context and target lengths, so that
tensors stack) and a batch is emitted when full; leftovers that never fill a batch wait for the next
epoch's shuffle. Batches then form steps of `world` batches of one group, in the order they fill
(ranks in lockstep: the same shapes on every rank at every step); step s gives rank r its r-th
batch, so ranks never share an item and all take the same number of steps per epoch. With one rank
the steps are the batches in order.

`state_dict()` = {"epoch", "batch"} (the next batch to draw); `load_state_dict` continues from it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from distill.seeds import derive_seed

from student.context import Context


def epoch_batches(dataset, batch_size: int, seed: int, epoch: int, rank: int, world: int,
                  shuffle: bool = True) -> list[list[int]]:
    """This rank's batches (lists of item indices) of one epoch."""
    if shuffle:
        gen = torch.Generator().manual_seed(derive_seed(seed, "data-order", epoch))
        order = torch.randperm(len(dataset), generator=gen).tolist()
    else:
        order = list(range(len(dataset)))
    steps = _lockstep(_batches(dataset, order, batch_size), world)
    if not steps:
        raise ValueError(f"{len(dataset)} items make too few full batches of {batch_size} of one group "
                         f"for {world} ranks")
    return [step[rank] for step in steps]


def _batches(dataset, order: list[int], batch_size: int) -> list[tuple[Any, list[int]]]:
    """(group, items) of the full batches walking `order`, each item joining its group's open batch."""
    open_: dict[Any, list[int]] = {}
    batches = []
    for i in order:
        key = dataset.group(i)
        group = open_.setdefault(key, [])
        group.append(i)
        if len(group) == batch_size:
            batches.append((key, group))
            open_[key] = []
    return batches


def _lockstep(batches: list[tuple[Any, list[int]]], world: int) -> list[list[list[int]]]:
    """Steps of `world` batches of one group, in the order they fill: every rank's batch of a step has
    the same shapes (a rollout then makes as many passes on every rank, which ZeRO-3 needs)."""
    steps, pending = [], {}
    for key, batch in batches:
        waiting = pending.setdefault(key, [])
        waiting.append(batch)
        if len(waiting) == world:
            steps.append(waiting)
            pending[key] = []
    return steps


def collate(samples: list[dict]) -> dict:
    """Stack tensors and contexts (same shapes required), list everything else."""
    out = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], Context):
            out[key] = Context.stack(values)
        elif isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(f"cannot batch {key!r} of shapes {sorted(shapes)}")
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out


class DataStream:
    """`next(stream)` → this rank's next micro-batch, epoch after epoch (the trainer's DataSource)."""

    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 shuffle: bool = True, collate_fn: Callable[[list], Any] = collate) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world, self.shuffle, self.collate_fn = rank, world, shuffle, collate_fn
        self.epoch, self.batch = 0, 0
        self._batches: list[list[int]] | None = None

    def _epoch(self) -> list[list[int]]:
        if self._batches is None:
            if hasattr(self.dataset, "set_epoch"):  # per-epoch draws of the dataset (negative context)
                self.dataset.set_epoch(self.epoch)
            self._batches = epoch_batches(self.dataset, self.batch_size, self.seed, self.epoch,
                                          self.rank, self.world, self.shuffle)
        return self._batches

    def __iter__(self) -> "DataStream":
        return self

    def __next__(self) -> Any:
        while self.batch >= len(self._epoch()):
            self.epoch, self.batch, self._batches = self.epoch + 1, 0, None
        items = self._epoch()[self.batch]
        self.batch += 1
        return self.collate_fn([self.dataset[i] for i in items])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "world": self.world}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["world"] != self.world:
            raise ValueError(f"data position was saved with seed {state['seed']} on {state['world']} "
                             f"ranks; this run has seed {self.seed} on {self.world}")
        self.epoch, self.batch, self._batches = state["epoch"], state["batch"], None
