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
    # the recipe keys that shape this stage's checkpoints (distill/keys.py `fingerprint`): recorded in each
    # COMMITTED marker and compared on resume, unless `force` (resume=force)
    fingerprint: dict | None = None
    force: bool = False

    def input(self, key: str, value: str, kind: str) -> Path:
        """The product of `kind` of the needed stage folder `value`, named by the recipe key `key`
        (e.g. dmd.teacher_from): it must be among `needs:` and have finished producing `kind`."""
        from distill import layout

        folder = self.needs.get(value)
        if folder is None:
            raise ValueError(f"{self.recipe}: {key}={value!r} is not among the stages in `needs:` "
                             f"({', '.join(sorted(self.needs)) or 'none'})")
        record = layout.done_record(folder)
        if record is None or record.get("produces") != kind:
            what = "has not finished" if record is None else f"produces {record.get('produces')!r}"
            raise ValueError(f"{self.recipe}: {key}={value!r}: {folder} {what}, not a {kind}")
        return layout.product(folder, kind)


class Stage(Protocol):
    """A stage class. `folder` names its folder in the run; `produces` (optional) the kind of product
    it leaves there (a key of `distill.layout.PRODUCTS`), which the runner records in DONE."""

    folder: ClassVar[str]
    produces: ClassVar[str | None]

    def __init__(self, cfg: DictConfig, ctx: StageContext) -> None: ...

    def run(self) -> dict[str, float]:
        """Do the stage's work (resuming if interrupted); return its final metrics."""
        ...
