"""Export a CausalStudent for serving, and load it back (diffusers + safetensors only, never DeepSpeed).

An export folder:

    transformer/            diffusers WanTransformer3DModel (config.json + safetensors), LoRA merged
    indicator.safetensors   the learned shot-boundary vector (indicator "learnable" only)
    <component>/            copied component folders (e.g. vae/, text_encoder/), when given as folders
    generator.json          {"format": 1, "student": StudentSettings, "components": {name: description}}

A component description is a JSON object (e.g. the recipe's codec / text_encoder section); its "path",
when it names a folder, is copied into the export and rewritten relative to it, and an object with
`save_pretrained` is saved under its name. `read_export` resolves those paths for
`StreamingGenerator.from_export`. The folder is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from student.model import INDICATOR_FILE, CausalStudent, settings_from_dict
from teacher.files import atomic_folder

GENERATOR_FILE = "generator.json"
EXPORT_FORMAT = 1


@dataclass
class ExportInfo:
    """What generator.json says: the student settings and the components with absolute paths."""

    folder: Path
    settings: dict
    components: dict[str, dict]


def merged_transformer(student: CausalStudent) -> torch.nn.Module:
    """The student's transformer with any peft LoRA adapters merged (on a copy; the student is untouched)."""
    transformer = student.transformer
    if not getattr(transformer, "peft_config", None):
        return transformer
    merged = copy.deepcopy(transformer)
    merged.fuse_lora()
    merged.unload_lora()
    return merged


def _write_components(components: Mapping[str, Any], folder: Path) -> dict[str, dict]:
    """Copy/save component folders into `folder`; return their descriptions with relative paths."""
    described = {}
    for name, value in components.items():
        if name in ("transformer", GENERATOR_FILE, INDICATOR_FILE) or "/" in name or name.startswith("."):
            raise ValueError(f"export component name {name!r} is reserved or not a plain folder name")
        if hasattr(value, "save_pretrained"):
            value.save_pretrained(folder / name)
            described[name] = {"path": name, "class": type(value).__name__}
            continue
        entry = dict(value)
        source = entry.get("path")
        if source:
            if not Path(source).is_dir():
                raise FileNotFoundError(f"export component {name}: {source} is not a folder")
            shutil.copytree(source, folder / name)
            entry["path"] = name
        described[name] = entry
    return described


def export_student(student: CausalStudent, folder: str | os.PathLike,
                   components: Mapping[str, Any] | None = None) -> Path:
    """Write the export folder (see module doc) atomically; returns its path."""
    with atomic_folder(folder) as tmp:
        merged_transformer(student).save_pretrained(str(tmp / "transformer"))
        if student.shot_indicator is not None:
            from safetensors.torch import save_file

            save_file({"shot_indicator": student.shot_indicator.detach().contiguous().cpu()},
                      str(tmp / INDICATOR_FILE))
        meta = {"format": EXPORT_FORMAT, "student": student.settings_dict(),
                "components": _write_components(components or {}, tmp)}
        (tmp / GENERATOR_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    final = Path(folder)
    return final


def _require(folder: Path, relative: str) -> Path:
    path = folder / relative
    if not path.exists():
        raise FileNotFoundError(f"{folder}: export is missing {relative}")
    return path


def read_export(folder: str | os.PathLike) -> ExportInfo:
    """Parse generator.json; component paths inside the export become absolute."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: export folder not found")
    meta_path = _require(root, GENERATOR_FILE)
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    for key in ("format", "student", "components"):
        if key not in meta:
            raise ValueError(f"{meta_path}: missing key {key!r}")
    if meta["format"] != EXPORT_FORMAT:
        raise ValueError(f"{meta_path}: export format {meta['format']} is not supported (expected {EXPORT_FORMAT})")
    components = {}
    for name, entry in meta["components"].items():
        entry = dict(entry)
        if entry.get("path") and not Path(entry["path"]).is_absolute():
            entry["path"] = str(_require(root, entry["path"]))
        components[name] = entry
    return ExportInfo(root, meta["student"], components)


def load_student(folder: str | os.PathLike, torch_dtype: torch.dtype | None = None,
                 attention_backend: str = "auto") -> CausalStudent:
    """CausalStudent from an export folder; a missing file is named in a one-line error."""
    from diffusers import WanTransformer3DModel

    info = read_export(folder)
    root = info.folder
    _require(root, "transformer/config.json")
    if not list((root / "transformer").glob("*.safetensors")):
        raise FileNotFoundError(f"{root}: export is missing transformer/*.safetensors")
    settings = settings_from_dict(info.settings, root / GENERATOR_FILE)
    kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
    transformer = WanTransformer3DModel.from_pretrained(str(root / "transformer"), **kwargs)
    student = CausalStudent(transformer, settings, attention_backend=attention_backend)
    if student.shot_indicator is not None:
        from safetensors.torch import load_file

        saved = load_file(str(_require(root, INDICATOR_FILE)))["shot_indicator"]
        with torch.no_grad():
            student.shot_indicator.copy_(saved.to(student.shot_indicator.dtype))
    return student.eval()
