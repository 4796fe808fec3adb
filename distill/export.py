"""Export a run's newest finished student for serving (`shotdistill export`, the export and eval stages).

A stage that trains a student declares `produces = "student"` and leaves a student folder
(student/folder.py) in its stage folder; the runner's DONE record says so. The newest finished one
(by when it finished) is exported, whatever the stage, or a stage folder named directly. The export
is the same student folder made self-contained: the component folders the stage referenced (the
Wan VAE, the UMT5 encoder and tokenizer) are copied in, and nothing else of a model root.
"""

from __future__ import annotations

import os
from pathlib import Path

from distill import layout


def find_student(source: str | os.PathLike) -> Path:
    """The stage folder whose student to export: `source` itself when it is a finished student stage,
    else the run folder `source`'s newest finished student stage."""
    root = Path(source)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: run or stage folder not found")
    record = layout.done_record(root)
    if record is not None and record.get("produces") == "student":
        return root
    if (layout.product(root, "student") / layout.GENERATOR_FILE).is_file():
        raise FileNotFoundError(f"{root}: the stage has not finished (no {layout.DONE} marker)")
    newest = layout.newest_product(root, "student")
    if newest is None:
        raise FileNotFoundError(f"{root}: no finished student (no stage folder whose {layout.DONE} says it "
                                "produces a student)")
    return newest


def export_run(source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Export the newest finished student of `source` (a run or stage folder) into `out`: a folder that
    may be replaced (teacher/files.py `check_replaceable`: absent, empty or one we wrote) and that is
    not, and does not contain, `source`, the student folder or a component folder it copies from."""
    from student.export import export_folder
    from student.folder import read_folder
    from teacher.files import check_replaceable

    student = layout.product(find_student(source), "student")
    components = [c["path"] for c in read_folder(student).components.values() if c.get("path")]
    check_replaceable(out, ours=(layout.GENERATOR_FILE,), inputs=[source, student, *components])
    return export_folder(student, out)
