"""What a stage is: a class built from (cfg, ctx) whose `run()` does the work and returns metrics.

The runner builds one `StageContext` per stage: where the run, the stage's own folder and its
TensorBoard folder are, the distributed environment, and the folders of the stages it `needs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

from omegaconf import DictConfig

from distill.distributed import DistEnv


@dataclass(frozen=True)
class StageContext:
    """Paths and processes a stage works with."""

    run_dir: Path    # <run.out>/<run.name>
    stage_dir: Path  # <run>/<folder>: config.yaml, deepspeed.*.json, checkpoints/, products
    tb_dir: Path     # <run>/tb/<folder>
    env: DistEnv
    recipe: Path     # the recipe file this stage was loaded from
    needs: dict[str, Path] = field(default_factory=dict)  # folder name -> stage folder it read


class Stage(Protocol):
    """A stage class. `folder` (optional class attribute) names its folder in the run."""

    folder: ClassVar[str]

    def __init__(self, cfg: DictConfig, ctx: StageContext) -> None: ...

    def run(self) -> dict[str, float]:
        """Do the stage's work (resuming if interrupted); return its final metrics."""
        ...
