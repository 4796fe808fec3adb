"""The student folder: one format for a stage's trained student and for a serving export.

    transformer/            diffusers WanTransformer3DModel (config.json + safetensors), LoRA merged
    indicator.safetensors   the learned shot-boundary vector (indicator "learnable" only)
    generator.json          {"format": 2, "student": StudentSettings, "components": {name: description},
                             "files": {relative path: {"size", "sha256"}} of every other file inside
                             but hidden ones}
    vae/ text_encoder/ tokenizer/   component folders held inside (a serving export; a tiny encoder)

A component description is a JSON object: codec {"kind": "patch", "patch", "mean", "std"} or {"kind": "wan",
"path", "dtype"}; text_encoder {"kind": "umt5", "path", "max_tokens", "dtype"}; video {"height",
"width", "fps", "frames"}. A "path" names a folder that holds the component's subfolders (`vae/`;
`text_encoder/` and `tokenizer/`: a Wan diffusers root, or the student folder itself as "."), or
the component folder itself. A stage folder references such folders where they are (a Wan root is
never copied into a run); a serving export copies exactly the subfolders it needs
(`COMPONENT_FOLDERS`) and points "path" at itself. Relative paths are relative to the folder.
`CausalStudent.from_pretrained` loads the student; `read_folder` gives the rest.

Loading verifies what it reads against "files" (`verify_files`): `from_pretrained` the transformer and
the indicator, `StreamingGenerator.from_export` the component folders held inside; a missing,
truncated or altered file stops the load with one line naming it. (A folder written before files
were recorded has no "files" and loads unverified.)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

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
    files: dict[str, dict] = field(default_factory=dict)  # relative path -> {"size", "sha256"}


def file_record(path: str | os.PathLike) -> dict:
    """{"size", "sha256"} of a file, read in 16 MiB blocks (student folders and prepared shards)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}


def record_files(folder: Path) -> dict[str, dict]:
    """The "files" entry of generator.json: every file under `folder` but generator.json itself and
    hidden bookkeeping files (names starting with "."; no loader reads them)."""
    found = {}
    for path in sorted(Path(folder).rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and rel.as_posix() != GENERATOR_FILE and not any(part.startswith(".") for part in rel.parts):
            found[rel.as_posix()] = file_record(path)
    return found


def verify_files(info: StudentFolder, select: Callable[[str], bool] = lambda rel: True) -> None:
    """Check the recorded files `select` picks against their size and sha256; FileNotFoundError or
    ValueError naming the file and the student folder."""
    for rel, want in sorted(info.files.items()):
        if not select(rel):
            continue
        path = info.folder / rel
        if not path.is_file():
            raise FileNotFoundError(f"{info.folder}: student folder is missing {rel}")
        size = path.stat().st_size
        if size != want["size"]:
            raise ValueError(f"{path}: {size} bytes, generator.json records {want['size']} (truncated or "
                             "replaced); export the student again")
        if file_record(path)["sha256"] != want["sha256"]:
            raise ValueError(f"{path}: contents differ from the sha256 generator.json records (corrupted); "
                             "export the student again")


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
    return StudentFolder(root, meta["student"], components, dict(meta.get("files") or {}))
