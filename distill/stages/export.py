"""Export a run's newest finished student for serving (`shotdistill export` and the `export` stage).

Every stage that trains the student saves its final student with `student.export.export_student`
into `<stage>/student/` and finishes with a `DONE` marker. The newest finished one, in pipeline order
dmd-inter > dmd-intra > causal-init, is exported (a stage folder may also be named directly), together
with what serving needs and the stage's resolved recipe describes:

- codec: {"kind": "patch", "patch"} or {"kind": "wan", "path": the VAE folder (copied), "dtype"};
- text_encoder: {"kind": "umt5", "path": text_encoder/ + tokenizer/ (copied; the tiny random T5 is
  rebuilt from its keys and saved), "max_tokens", "dtype"};
- video: {"height", "width", "fps", "frames"} from `data.*` (the default shot length is the training one).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from distill.runner import DONE

STUDENT_STAGES = ("dmd-inter", "dmd-intra", "causal-init")  # newest first, in pipeline order
STUDENT_FOLDER = "student"


def find_student_stage(source: str | os.PathLike) -> Path:
    """The stage folder whose student to export: `source` itself when it holds a finished student,
    else the newest finished student stage of the run folder `source`."""
    from student.export import GENERATOR_FILE

    root = Path(source)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: run or stage folder not found")
    candidates = [root] + [root / name for name in STUDENT_STAGES]
    for stage in candidates:
        if (stage / DONE).is_file() and (stage / STUDENT_FOLDER / GENERATOR_FILE).is_file():
            return stage
    if (root / STUDENT_FOLDER).is_dir():
        raise FileNotFoundError(f"{root}: the stage has not finished (no {DONE} marker)")
    raise FileNotFoundError(f"{root}: no finished student (looked for {', '.join(STUDENT_STAGES)} with "
                            f"{DONE} and {STUDENT_FOLDER}/{GENERATOR_FILE})")


def _component_dir(root: str, name: str) -> Path:
    path = Path(root)
    if not path.is_dir():
        raise FileNotFoundError(f"{root}: model folder not found")
    return path / name if (path / name).is_dir() else path


def serving_components(cfg: DictConfig, workdir: Path) -> dict[str, dict]:
    """Component descriptions (see module doc); folders made here are written under `workdir`."""
    from distill.data.components import build_text_encoder

    codec = {"kind": "patch", "patch": int(cfg.codec.patch)} if cfg.codec.kind == "patch" else \
        {"kind": "wan", "path": str(_component_dir(cfg.codec.path, "vae")), "dtype": cfg.codec.dtype}
    text = workdir / "text_encoder"
    if cfg.text_encoder.kind == "tiny_t5":
        build_text_encoder(cfg.text_encoder).save_pretrained(text)
        dtype = "float32"
    else:
        # Only text_encoder/ and tokenizer/ of a Wan root: links that copytree follows.
        text.mkdir()
        for part in ("text_encoder", "tokenizer"):
            (text / part).symlink_to(_component_dir(cfg.text_encoder.path, part).resolve())
        dtype = cfg.text_encoder.dtype
    video = {"height": int(cfg.data.height), "width": int(cfg.data.width), "fps": float(cfg.data.fps),
             "frames": int(cfg.data.shot_frames)}
    return {"codec": codec, "text_encoder": {"kind": "umt5", "path": str(text),
                                             "max_tokens": int(cfg.text_encoder.max_tokens), "dtype": dtype},
            "video": video}


def export_run(source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Export the newest finished student of `source` (a run or stage folder) into `out`."""
    from distill.config import load_recipe
    from student.export import export_student, load_student

    stage = find_student_stage(source)
    cfg = load_recipe(stage / "config.yaml")
    student = load_student(stage / STUDENT_FOLDER)
    parent = Path(out).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=parent) as work:
        return export_student(student, out, serving_components(cfg, Path(work)))


class ExportStage:
    """`stage: export`: the run's newest finished student, exported into the stage folder."""

    folder = "export"

    def __init__(self, cfg: DictConfig, ctx) -> None:
        self.cfg, self.ctx = cfg, ctx

    def run(self) -> dict[str, float]:
        from distill.distributed import barrier

        if self.ctx.env.is_main:
            build = self.ctx.run_dir / f".export-build-{os.getpid()}"
            export_run(self.ctx.run_dir, build)
            _move_into(build, self.ctx.stage_dir)
        barrier()
        return {}


def _move_into(build: Path, folder: Path) -> None:
    """Move an export's entries into `folder` (which keeps the runner's files), generator.json last."""
    from student.export import GENERATOR_FILE

    folder.mkdir(parents=True, exist_ok=True)
    (folder / GENERATOR_FILE).unlink(missing_ok=True)  # an old export is incomplete from here on
    entries = sorted(build.iterdir(), key=lambda p: p.name == GENERATOR_FILE)
    for entry in entries:
        target = folder / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    build.rmdir()
