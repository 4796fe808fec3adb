"""Every folder and file name of a run, defined once (DESIGN.md "A run folder").

    <run.out>/<run.name>/
      .lock                       held (flock) by rank 0 of the one run writing the folder: host, pid
      config.yaml                 the invoked recipe, resolved (written when some stage of it runs)
      tb/<stage>/                 TensorBoard events, one folder per stage
      <stage>/                    one folder per stage (the stage class's `folder`):
        config.yaml               its resolved recipe
        deepspeed.<model>.json    the derived DeepSpeed config of each trained model
        checkpoints/step-NNNNNN/  committed checkpoints
        metrics.json              its final numbers
        DONE                      written last: {"metrics", "wall_s", "produces", "fingerprint", ...}
        model/ | student/         its product (what the stage class declares it `produces`)
      prepare/ export/ eval/      the folders of the prepare, export and eval stages

A stage class declares what it produces (`produces = "student"`); the runner records it in `DONE`,
so the newest finished student of a run is found among all its stages, a user's own included.
"""

from __future__ import annotations

import json
from pathlib import Path

from student.folder import GENERATOR_FILE

CONFIG = "config.yaml"
LOCK = ".lock"
DONE = "DONE"
METRICS = "metrics.json"
CHECKPOINTS = "checkpoints"
TB = "tb"
PREPARE, EXPORT, EVAL = "prepare", "export", "eval"  # stage folders other stages and commands look for

# what a stage produces -> where inside its folder ("": the stage folder itself)
PRODUCTS = {"prepared": "", "teacher": "model", "ode_pairs": "", "student": "student", "export": ""}

__all__ = ["CONFIG", "LOCK", "DONE", "METRICS", "CHECKPOINTS", "TB", "PREPARE", "EXPORT", "EVAL", "PRODUCTS",
           "GENERATOR_FILE", "run_dir", "tb_dir", "product", "done_record", "finished_products", "newest_product"]


def run_dir(out: str | Path, name: str) -> Path:
    """`<run.out>/<run.name>`."""
    return Path(out) / name


def tb_dir(run: Path, folder: str) -> Path:
    return Path(run) / TB / folder


def product(stage_dir: str | Path, kind: str) -> Path:
    """Where a stage folder holds its product of `kind` (a key of PRODUCTS)."""
    if kind not in PRODUCTS:
        raise ValueError(f"unknown product kind {kind!r}: expected one of {', '.join(PRODUCTS)}")
    return Path(stage_dir) / PRODUCTS[kind] if PRODUCTS[kind] else Path(stage_dir)


def done_record(stage_dir: str | Path) -> dict | None:
    """The stage's DONE record, or None when it has not finished."""
    marker = Path(stage_dir) / DONE
    return json.loads(marker.read_text()) if marker.is_file() else None


def finished_products(run: str | Path, kind: str) -> list[Path]:
    """Finished stage folders of the run that produce `kind`, oldest first (by when they finished)."""
    found = []
    for stage in Path(run).iterdir() if Path(run).is_dir() else ():
        record = done_record(stage) if stage.is_dir() else None
        if record is not None and record.get("produces") == kind:
            found.append((record.get("finished", (stage / DONE).stat().st_mtime), stage.name, stage))
    return [stage for *_, stage in sorted(found)]


def newest_product(run: str | Path, kind: str) -> Path | None:
    """The stage folder of the run that most recently finished producing `kind`, or None."""
    found = finished_products(run, kind)
    return found[-1] if found else None
