"""`EvalRun`: what every scoring loop and probe takes about the evaluation it is part of.

One object instead of the recipe's `eval` section, the device, the base seed, this process's rank
and the world size (and, for a scoring run, its output and TensorBoard folders) passed one by one.
Item i of an evaluation draws its noise from a seed derived from `seed` and i, so every rank count
gives the same numbers; `share` is this rank's part of the items (distill/eval/split.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from omegaconf import DictConfig

from distill.eval.split import rank_share


@dataclass(frozen=True)
class EvalRun:
    """An evaluation's settings and place in the job (see module doc)."""

    device: torch.device
    seed: int
    rank: int = 0
    world: int = 1
    ev: DictConfig | None = None  # the recipe's `eval` section (scoring runs); None for in-training probes
    out: Path | None = None       # output folder of a scoring run: samples/, report.json
    tb_dir: Path | None = None    # TensorBoard folder for the eval/<metric> scalars; None: not logged

    @classmethod
    def of(cls, env, seed: int, ev=None, out: str | Path | None = None, tb_dir: str | Path | None = None) -> EvalRun:
        """The run of a process of the job (`env`: distill.distributed.DistEnv)."""
        return cls(env.device, seed, env.rank, env.world_size, ev, _path(out), _path(tb_dir))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, count: int) -> list[tuple[int, float]]:
        """(item, weight) of this rank's items out of `count`, padded so every rank runs as many."""
        return rank_share(count, self.rank, self.world)

    def into(self, out: str | Path, tb_dir: str | Path | None = None) -> EvalRun:
        """The same run writing into another folder (and TensorBoard folder, or none)."""
        return replace(self, out=Path(out), tb_dir=_path(tb_dir))


def _path(value: str | Path | None) -> Path | None:
    return None if value is None else Path(value)
