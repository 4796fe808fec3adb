"""The student folder: one format for a stage's trained student and for a serving export.

    transformer/            diffusers WanTransformer3DModel (config.json + safetensors), LoRA merged
    indicator.safetensors   the learned shot-boundary vector (indicator "learnable" only)
    generator.json          {"format": 2, "student": StudentSettings, "components": {name: description}}
    vae/ text_encoder/ tokenizer/   component folders held inside (a serving export; a tiny encoder)

A component description is a JSON object: codec {"kind": "patch", "patch"} or {"kind": "wan",
"path", "dtype"}; text_encoder {"kind": "umt5", "path", "max_tokens", "dtype"}; video {"height",
"width", "fps", "frames"}. A "path" names a folder that holds the component's subfolders (`vae/`;
`text_encoder/` and `tokenizer/`: a Wan diffusers root, or the student folder itself as "."), or
the component folder itself. A stage folder references such folders where they are (a Wan root is
never copied into a run); a serving export copies exactly the subfolders it needs
(`COMPONENT_FOLDERS`) and points "path" at itself. Relative paths are relative to the folder.
`CausalStudent.from_pretrained` loads the student; `read_folder` gives the rest.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

GENERATOR_FILE = "generator.json"
TRANSFORMER = "transformer"
INDICATOR_FILE = "indicator.safetensors"
FORMAT = 2
# the subfolders each component kind loads from its "path" (teacher/encoders.py `component_folder`)
COMPONENT_FOLDERS = {"wan": ("vae",), "umt5": ("text_encoder", "tokenizer")}


@dataclass
class StudentFolder:
    """What generator.json says: the student settings and the components with absolute paths."""

    folder: Path
    settings: dict
    components: dict[str, dict]


def require(folder: Path, relative: str) -> Path:
    """`folder/relative`, or FileNotFoundError naming the student folder and the missing part."""
    path = folder / relative
    if not path.exists():
        raise FileNotFoundError(f"{folder}: student folder is missing {relative}")
    return path


def read_folder(folder: str | os.PathLike) -> StudentFolder:
    """Parse generator.json; relative component paths become absolute."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: student folder not found")
    meta_path = require(root, GENERATOR_FILE)
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    for key in ("format", "student", "components"):
        if key not in meta:
            raise ValueError(f"{meta_path}: missing key {key!r}")
    if meta["format"] != FORMAT:
        raise ValueError(f"{meta_path}: student folder format {meta['format']} is not supported (expected {FORMAT}); "
                         "export the run again")
    components = {}
    for name, entry in meta["components"].items():
        entry = dict(entry)
        if entry.get("path") and not Path(entry["path"]).is_absolute():
            inside = require(root, entry["path"])
            for part in COMPONENT_FOLDERS.get(entry.get("kind"), ()):  # held inside: they must be there
                require(root, str(Path(entry["path"]) / part))
            entry["path"] = str(inside.resolve())
        components[name] = entry
    return StudentFolder(root, meta["student"], components)
