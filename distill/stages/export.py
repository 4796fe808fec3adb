"""`stage: export`: the run's newest finished student, exported for serving into the stage folder
(distill/export.py). The stage folder keeps the runner's files beside the export's."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from omegaconf import DictConfig

from distill import layout


class ExportStage:
    """`stage: export`: the run's newest finished student, exported into the stage folder."""

    folder = layout.EXPORT
    produces = "export"

    def __init__(self, cfg: DictConfig, ctx) -> None:
        self.cfg, self.ctx = cfg, ctx

    def run(self) -> dict[str, float]:
        from distill.distributed import barrier
        from distill.export import export_run

        if self.ctx.env.is_main:
            build = self.ctx.run_dir / f".export-build-{os.getpid()}"
            export_run(self.ctx.run_dir, build)
            _move_into(build, self.ctx.stage_dir)
        barrier()
        return {}


def _move_into(build: Path, folder: Path) -> None:
    """Move an export's entries into `folder` (which keeps the runner's files), generator.json last."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / layout.GENERATOR_FILE).unlink(missing_ok=True)  # an old export is incomplete from here on
    entries = sorted(build.iterdir(), key=lambda p: p.name == layout.GENERATOR_FILE)
    for entry in entries:
        target = folder / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    build.rmdir()
