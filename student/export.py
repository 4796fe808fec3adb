"""Write a CausalStudent as a student folder (student/folder.py): a stage's product or a serving export.

`save_student(student, folder, components, copy)` writes the folder atomically. A component
description whose "path" names folders on disk is referenced in place, or with `copy` its
subfolders (`COMPONENT_FOLDERS`: `vae/`, or `text_encoder/` + `tokenizer/`) are copied into the
folder: never a whole model root. A component given as an object with `save_pretrained` (the tiny
random text encoder, which exists nowhere on disk) is saved inside. A student with peft LoRA
adapters is saved merged, and its adapters beside the weights (transformer_lora/).

`export_folder` copies a finished student folder into a self-contained serving export, which is also
a diffusers pipeline (student/pipeline.py) with a model card; `verify_export` checks that an export
generates what the trained student generates.
"""

from __future__ import annotations

import copy as copying
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

from student.folder import (COMPONENT_FOLDERS, FORMAT, GENERATOR_FILE, INDICATOR_FILE, LEGACY_TRANSFORMER_CONFIG,
                            LORA, TRANSFORMER, TRANSFORMER_CONFIG, read_folder, record_files)
from student.model import CausalStudent, CausalWanTransformer3DModel
from teacher.encoders import DTYPES, component_folder
from teacher.files import atomic_folder, write_atomic

MODEL_CARD = "README.md"
# the 2-shot story `verify_export` generates (words of the synthetic world; any text encoder takes them)
VERIFY_PROMPTS = ("wide: a red circle moves left", "close-up: the red circle turns right")
# mean |export − trained| of the story's frames, as a fraction of the pixel range, allowed against the
# trained student in float32, per export dtype: float32 repeats the trained computation; half
# precision rounds every weight and activation, and the rounding compounds through the cache over
# chunks and shots. Against the trained student loaded in the export's own dtype, float32's bound
# holds for every dtype: the export must compute exactly that.
VERIFY_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.05, torch.float16: 0.02}


def merged_transformer(student: CausalStudent) -> torch.nn.Module:
    """The student's transformer with any peft LoRA adapters merged (on a copy; the student is untouched)."""
    transformer = student.transformer
    if not getattr(transformer, "peft_config", None):
        return transformer
    merged = copying.deepcopy(transformer)
    merged.fuse_lora()
    merged.unload_lora()
    return merged


def save_transformer(transformer: torch.nn.Module, folder: Path) -> None:
    """Weights by diffusers, config as causal_config.json naming our class (student/folder.py)."""
    transformer.save_pretrained(str(folder))
    plain = folder / LEGACY_TRANSFORMER_CONFIG
    if plain.is_file():  # a plain WanTransformer3DModel (a student made from its teacher) writes config.json
        config = json.loads(plain.read_text())
        config["_class_name"] = CausalWanTransformer3DModel.__name__
        (folder / TRANSFORMER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        plain.unlink()


def save_adapters(transformer: torch.nn.Module, folder: Path) -> None:
    """The transformer's peft LoRA adapters in peft's own layout (PeftModel.save_pretrained's): per
    adapter adapter_config.json + adapter_model.safetensors, "default" in `folder`, others in
    subfolders, keys under "base_model.model." so that `PeftModel.from_pretrained(base, folder)` loads
    them onto the student the adapters were trained on."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    for name, config in transformer.peft_config.items():
        target = folder if name == "default" else folder / name
        target.mkdir(parents=True, exist_ok=True)
        state = get_peft_model_state_dict(transformer, adapter_name=name)
        save_file({f"base_model.model.{key}": value.detach().contiguous().cpu() for key, value in state.items()},
                  str(target / "adapter_model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(str(target))


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


def _write_student(student: CausalStudent, folder: Path, components: Mapping[str, Any] | None,
                   copy: bool) -> dict[str, dict]:
    """Transformer, adapters, indicator and components into `folder`; the components' descriptions."""
    save_transformer(merged_transformer(student), folder / TRANSFORMER)
    if getattr(student.transformer, "peft_config", None):
        save_adapters(student.transformer, folder / LORA)
    if student.shot_indicator is not None:
        from safetensors.torch import save_file

        save_file({"shot_indicator": student.shot_indicator.detach().contiguous().cpu()},
                  str(folder / INDICATOR_FILE))
    return {name: _component(name, value, folder, copy) for name, value in (components or {}).items()}


def _write_generator_json(student: CausalStudent, folder: Path, described: dict[str, dict]) -> None:
    """generator.json, last: it records every file written before it (checked on load, verify_files)."""
    dtype = {v: k for k, v in DTYPES.items()}[student.transformer.dtype]
    meta = {"format": FORMAT, "student": student.settings.to_dict(), "components": described, "dtype": dtype,
            "files": record_files(folder)}
    write_atomic(folder / GENERATOR_FILE, json.dumps(meta, indent=2) + "\n")


def save_student(student: CausalStudent, folder: str | os.PathLike, components: Mapping[str, Any] | None = None,
                 copy: bool = False) -> Path:
    """Write the student folder atomically (see module doc); returns its path."""
    with atomic_folder(folder, ours=(GENERATOR_FILE,)) as tmp:  # or a student folder from before the marker
        _write_generator_json(student, tmp, _write_student(student, tmp, components, copy))
    return Path(folder)


def export_folder(source: str | os.PathLike, out: str | os.PathLike, torch_dtype: torch.dtype | None = None,
                  card: str | None = None) -> Path:
    """A self-contained serving export of the student folder `source`: the student rewritten (in
    `torch_dtype`, default its own), every component folder it references copied (only the
    subfolders the components load), its LoRA adapters copied, the diffusers pipeline files and the
    model card `card` (README.md)."""
    from student.pipeline import write_pipeline_files

    info = read_folder(source)
    student = CausalStudent.from_pretrained(info.folder, torch_dtype=torch_dtype)
    with atomic_folder(out, ours=(GENERATOR_FILE,)) as tmp:
        described = _write_student(student, tmp, info.components, copy=True)
        if (info.folder / LORA).is_dir():  # the loaded student is merged: its adapters exist only as files
            shutil.copytree(info.folder / LORA, tmp / LORA)
        write_pipeline_files(tmp, student.settings, described)
        if card is not None:
            (tmp / MODEL_CARD).write_text(card)
        _write_generator_json(student, tmp, described)
    return Path(out)


def verify_export(export: str | os.PathLike, student_folder: str | os.PathLike, device: torch.device | str = "cpu",
                  seed: int = 0) -> dict[str, float]:
    """Generate the 2-shot story `VERIFY_PROMPTS` (one chunk a shot: the second conditions on the
    first) with the export, loaded as diffusers loads it, and with the trained student of
    `student_folder`, from the same seed: in float32 (within the export dtype's `VERIFY_TOLERANCE`)
    and, for a half-precision export, in its dtype too (within float32's). ValueError naming the
    export when a story differs more; else the mean |difference| (0..1) per reference dtype."""
    from diffusers import DiffusionPipeline

    from student.generator import StreamingGenerator

    pipe = DiffusionPipeline.from_pretrained(str(export), trust_remote_code=True)
    if torch.device(device).type != "cpu":  # a no-op on the CPU, where diffusers warns about half precision
        pipe.to(device)
    dtype = pipe.transformer.dtype
    allowed = {torch.float32: VERIFY_TOLERANCE[dtype], dtype: VERIFY_TOLERANCE[torch.float32]}
    frames = pipe.stream().frames_for(1)
    ours = torch.cat(pipe(list(VERIFY_PROMPTS), seed=seed, num_frames=frames).frames).float()
    gaps = {}
    for reference, bound in allowed.items():
        trained = StreamingGenerator.from_export(student_folder, device=device, dtype=reference, seed=seed)
        theirs = torch.cat([torch.cat(list(trained.next_shot(prompt, frames))) for prompt in VERIFY_PROMPTS])
        name = str(reference).removeprefix("torch.")
        # frames of another shape (other settings) are as different as frames get
        gaps[name] = (ours - theirs.float()).abs().mean().item() / 255.0 if ours.shape == theirs.shape else 1.0
        if not gaps[name] <= bound:
            raise ValueError(f"{export}: export does not generate what the trained student {student_folder} does in "
                             f"{name}: mean |difference| {gaps[name]:.4f} of the pixel range over a "
                             f"{len(VERIFY_PROMPTS)}-shot story, more than the {bound} allowed for a "
                             f"{str(dtype).removeprefix('torch.')} export")
    return gaps
