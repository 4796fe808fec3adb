"""Write a CausalStudent as a student folder (student/folder.py): a stage's product or a serving export.

`save_student(student, folder, components, copy)` writes the folder atomically. A component
description whose "path" names folders on disk is referenced in place, or with `copy` its
subfolders (`COMPONENT_FOLDERS`: `vae/`, or `text_encoder/` + `tokenizer/`) are copied into the
folder: never a whole model root. A component given as an object with `save_pretrained` (the tiny
random text encoder, which exists nowhere on disk) is saved inside. `export_folder` copies a finished
student folder into a self-contained serving export.
"""

from __future__ import annotations

import copy as copying
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

from student.folder import (COMPONENT_FOLDERS, FORMAT, GENERATOR_FILE, INDICATOR_FILE, TRANSFORMER,
                            read_folder, record_files)
from student.model import CausalStudent
from teacher.encoders import component_folder
from teacher.files import atomic_folder, write_atomic

def merged_transformer(student: CausalStudent) -> torch.nn.Module:
    """The student's transformer with any peft LoRA adapters merged (on a copy; the student is untouched)."""
    transformer = student.transformer
    if not getattr(transformer, "peft_config", None):
        return transformer
    merged = copying.deepcopy(transformer)
    merged.fuse_lora()
    merged.unload_lora()
    return merged


def _component(name: str, value: Any, folder: Path, copy: bool) -> dict:
    """One component's description, with its folders copied into (or its object saved in) `folder`."""
    if hasattr(value, "save_pretrained"):
        value.save_pretrained(folder)
        return {"kind": "umt5", "path": ".", "max_tokens": value.max_tokens, "dtype": "float32"}
    entry = dict(value)
    source = entry.get("path")
    if not source:
        return entry
    if not Path(source).is_dir():
        raise FileNotFoundError(f"student component {name}: {source} is not a folder")
    if not copy:
        entry["path"] = str(Path(source).resolve())
        return entry
    for part in COMPONENT_FOLDERS.get(entry.get("kind"), ()):
        if (folder / part).exists():
            raise ValueError(f"student components {name!r} and another both want the folder {part}/")
        shutil.copytree(component_folder(source, part), folder / part)
    entry["path"] = "."
    return entry


def save_student(student: CausalStudent, folder: str | os.PathLike, components: Mapping[str, Any] | None = None,
                 copy: bool = False) -> Path:
    """Write the student folder atomically (see module doc); returns its path."""
    import json

    with atomic_folder(folder, ours=(GENERATOR_FILE,)) as tmp:  # or a student folder from before the marker
        merged_transformer(student).save_pretrained(str(tmp / TRANSFORMER))
        if student.shot_indicator is not None:
            from safetensors.torch import save_file

            save_file({"shot_indicator": student.shot_indicator.detach().contiguous().cpu()},
                      str(tmp / INDICATOR_FILE))
        described = {name: _component(name, value, tmp, copy) for name, value in (components or {}).items()}
        meta = {"format": FORMAT, "student": student.settings.to_dict(), "components": described,
                "files": record_files(tmp)}  # checked on load (student/folder.py verify_files)
        write_atomic(tmp / GENERATOR_FILE, json.dumps(meta, indent=2) + "\n")
    return Path(folder)


def export_folder(source: str | os.PathLike, out: str | os.PathLike,
                  torch_dtype: torch.dtype | None = None) -> Path:
    """A self-contained serving export of the student folder `source`: the student rewritten and every
    component folder it references copied (only the subfolders the components load)."""
    info = read_folder(source)
    student = CausalStudent.from_pretrained(info.folder, torch_dtype=torch_dtype)
    return save_student(student, out, info.components, copy=True)
