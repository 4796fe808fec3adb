"""The student folder: one format for a stage's trained student and for a serving export.

    transformer/            the Wan transformer's weights (diffusers safetensors, LoRA merged) and its config
                            as causal_config.json: deliberately not config.json, so diffusers'
                            WanTransformer3DModel.from_pretrained refuses the folder instead of loading a
                            bidirectional model without shot RoPE, context or cache (folders written before
                            have config.json and still load)
    transformer_lora/       the inter-shot LoRA as a peft adapter (adapter_config.json, adapter_model.safetensors)
                            when the student was trained with adapters (dmd-inter); the base it applies to is
                            the student that stage started from
    indicator.safetensors   the learned shot-boundary vector (indicator "learnable" only)
    generator.json          {"format": 2, "student": StudentSettings, "components": {name: description},
                             "dtype": the transformer's weights dtype, "files": {relative path: {"size",
                             "sha256"}} of every other file inside but hidden ones}
    vae/ text_encoder/ tokenizer/   component folders held inside (a serving export; a tiny encoder)

A serving export is also a diffusers pipeline (student/pipeline.py): model_index.json, pipeline.py,
scheduler/scheduler_config.json and a model card README.md, all derived from generator.json when the
export is written and recorded in its "files".

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
TRANSFORMER_CONFIG = "causal_config.json"  # inside transformer/ (see the module doc)
LEGACY_TRANSFORMER_CONFIG = "config.json"  # folders written before: diffusers' own name
LORA = "transformer_lora"
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
    dtype: str | None = None  # the transformer's weights dtype; None: a folder written before it was recorded


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


def verify_components(info: StudentFolder) -> None:
    """`verify_files` for every file but the transformer and the indicator (`CausalStudent.from_pretrained`
    checks those): what a loader of a whole export checks besides the student."""
    verify_files(info, lambda rel: not rel.startswith(f"{TRANSFORMER}/") and rel != INDICATOR_FILE)


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
    return StudentFolder(root, meta["student"], components, dict(meta.get("files") or {}), meta.get("dtype"))


def transformer_config(folder: Path) -> Path:
    """The transformer's config file in the student folder `folder` (causal_config.json, or a folder
    from before: config.json); FileNotFoundError naming the folder and the expected file."""
    for name in (TRANSFORMER_CONFIG, LEGACY_TRANSFORMER_CONFIG):
        if (folder / TRANSFORMER / name).is_file():
            return folder / TRANSFORMER / name
    return require(folder, f"{TRANSFORMER}/{TRANSFORMER_CONFIG}")
