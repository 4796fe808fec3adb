"""The official ShotStream release as a starting point (`shotdistill import shotstream`).

The release (code: github.com/KlingAIResearch/ShotStream, weights: huggingface.co/KlingTeam/ShotStream)
ships `bidirectional_teacher.pt`, the next-shot teacher, and `ode_init.pt`, the causal student after
ODE init. Each is `torch.save({"generator": state_dict, ...})` of the release's `WanDiffusionWrapper`,
whose `model` is the Wan2.1 network: keys are the original Wan layout prefixed `model.`
(`model.blocks.0.self_attn.q.weight`, `model.head.modulation`, ...). Its loaders read
`checkpoint["generator"]`; a bare state dict is accepted here too.

`import_release` reads each file without running code from it (`distill.checkpoint.safe_load`:
torch.load with weights_only=True), strips `model.`, renames the keys with diffusers' own
`convert_wan_transformer_to_diffusers`, loads them strictly into a `WanTransformer3DModel` built from
`<wan root>/transformer/config.json` (dtype as stored) and writes, all at once or not at all:

    <out>/teacher/      a NextShotTeacher folder with the release's conventions (CONVENTIONS)
    <out>/student/      with a student file: a student folder (student/folder.py) whose components
                        reference the Wan root's vae/, text_encoder/ and tokenizer/
    <out>/recipe.yaml   a recipe fragment: model.path and the convention keys, each commented
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

PREFIX = "model."   # the release's WanDiffusionWrapper holds the Wan network as `model`
TEACHER, STUDENT, RECIPE = "teacher", "student", "recipe.yaml"
SHOWN = 5           # keys named in a mismatch message


@dataclass(frozen=True)
class Convention:
    """One recipe key of the release: its value, what it reproduces and the keyword it sets on the
    teacher (`NextShotTeacher`) or the student (`CausalStudent.from_teacher`), if any."""

    key: str
    value: Any
    reproduces: str
    teacher: str = ""
    student: str = ""


CONVENTIONS = (
    Convention("teacher.positions", "shot_rope", "shot k's frames turn every temporal RoPE band by the "
               "phase k*theta (the release's rope_apply_dynamic)", teacher="positions"),
    Convention("teacher.theta", 1.0 / 6.0, "that phase per shot, in radians (release: theta=1/6)",
               teacher="theta"),
    Convention("teacher.captions", "target_only", "every frame, context included, attends to the target's "
               "text, the one string of the joint layout below", teacher="captions"),
    Convention("teacher.context_timestep", "target", "the clean context tokens run at the target's "
               "timestep, as the released teacher was trained", teacher="context_timestep"),
    Convention("text_encoder.caption_layout", "joint", "a shot's text is one string, the global caption then "
               "'shot{i}:' + each caption so far, as the released models were trained", student="caption_layout"),
    Convention("student.chunk_frames", 3, "latent frames per chunk (release: num_frame_per_block 3)",
               student="chunk_frames"),
    Convention("student.local_chunks", 7, "chunks of the current shot in the local KV cache (release: "
               "up to 7 chunks, the 21 latent frames of an 81-frame shot)", student="local_chunks"),
    Convention("student.denoising_steps", [1000.0, 740.0, 500.0, 260.0], "the release's "
               "denoising_step_list", student="denoising_steps"),
    Convention("student.shift", 8.0, "those steps warped at timestep_shift 8 (release: "
               "warp_denoising_step)", student="shift"),
    Convention("data.context.strategy", "dynamic", "context frames sampled from the history shots "
               "(release: dynamic_sample_frames)", student="context_strategy"),
    Convention("data.context.budget", 6, "context frames, the global cache (release: max_context_frames 6)",
               student="context_frames"),
)
# What the release's student was trained on (Wan2.1-T2V-1.3B's): the components a student folder
# describes (distill.models.student_components), read from the Wan root.
RELEASE_COMPONENTS = {
    "codec": {"kind": "wan", "dtype": "bfloat16"},
    "text_encoder": {"kind": "umt5", "max_tokens": 512, "dtype": "bfloat16"},
    "data": {"height": 480, "width": 832, "fps": 16.0, "shot_frames": 81},
}


# ---- reading a release file --------------------------------------------------------------------------


def load_generator(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict a release file holds (under "generator", or bare), prefix kept; one-line
    errors naming the file for anything but tensors, a missing or unreadable file."""
    from distill.checkpoint import safe_load

    held = safe_load(path, map_location="cpu")
    state = held.get("generator", held) if isinstance(held, dict) else held
    if not isinstance(state, dict) or not state:
        what = f"a {type(held).__name__}" if not isinstance(held, dict) else \
            f"no \"generator\" state dict (keys: {', '.join(map(str, list(held)[:SHOWN]))})"
        raise ValueError(f"{path}: holds {what}, not a Wan state dict")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: {key!r} holds a {type(value).__name__}, not a tensor: "
                             "not a Wan state dict")
    return state


def to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Wan keys (with or without the release's `model.` prefix) → diffusers keys."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    stripped = {key[len(PREFIX):] if key.startswith(PREFIX) else key: value for key, value in state.items()}
    return convert_wan_transformer_to_diffusers(stripped)  # renames in place: `stripped` is ours


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:SHOWN]) + (f" (+{len(keys) - SHOWN} more)" if len(keys) > SHOWN else "")


def wan_transformer(path: str | os.PathLike, config_folder: Path) -> torch.nn.Module:
    """The release file `path` as a diffusers WanTransformer3DModel configured by `config_folder`,
    its weights loaded strictly and kept in the file's dtype (built without weights of its own:
    the file's tensors become its parameters, so the import holds one copy of the model)."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    state = to_diffusers(load_generator(path))
    with init_empty_weights():   # parameters on the meta device; buffers (RoPE tables) real
        model = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(str(config_folder)))
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = [f"missing {_few(missing)}" if missing else "", f"unexpected {_few(unexpected)}" if unexpected else ""]
        raise ValueError(f"{path}: does not fit the Wan transformer of {config_folder}: "
                         f"{'; '.join(p for p in parts if p)}")
    for key, value in expected.items():
        if state[key].shape != value.shape:
            raise ValueError(f"{path}: {key} has shape {list(state[key].shape)}, the Wan transformer of "
                             f"{config_folder} expects {list(value.shape)}")
    model.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True, assign=True)
    return model.eval()


# ---- the conventions ------------------------------------------------------------------------------------


def teacher_settings() -> dict:
    """The release's NextShotTeacher keywords."""
    return {c.teacher: c.value for c in CONVENTIONS if c.teacher}


def student_settings() -> dict:
    """The release's CausalStudent.from_teacher keywords."""
    return {c.student: c.value for c in CONVENTIONS if c.student}


def release_components(wan_root: Path) -> dict:
    """The codec, text encoder and video of the release's student, with the Wan root's folders."""
    from omegaconf import OmegaConf

    from distill.config import schema
    from distill.models import student_components

    parts = {name: dict(values) for name, values in RELEASE_COMPONENTS.items()}
    parts["codec"]["path"] = parts["text_encoder"]["path"] = str(wan_root)
    return student_components(OmegaConf.merge(schema(), parts))


def recipe_fragment(wan_root: Path, teacher_file: Path, student_file: Path | None) -> str:
    """The text of recipe.yaml."""
    entries = [("model.path", str(wan_root), "the Wan2.1-T2V-1.3B diffusers root the checkpoints were "
                "converted against (codec.path and text_encoder.path follow it in the Wan recipes)")]
    entries += [(c.key, c.value, c.reproduces) for c in CONVENTIONS]
    lines = [
        "# The official ShotStream release's conventions (shotdistill import shotstream), with which",
        f"#   {teacher_file}" + (f" and {student_file}" if student_file else ""),
        "# were trained. Copy these keys into a Wan recipe (recipes/wan2.1-1.3b/), or `base:` this file",
        "# from a recipe of your own. teacher/ loads with NextShotTeacher.from_pretrained; student/ is a",
        "# student folder (`shotdistill generate <this folder>/student --shot ...` streams from it).",
    ]
    section: tuple[str, ...] = ()
    for key, value, reproduces in entries:
        *path, leaf = key.split(".")
        for depth, name in enumerate(path):
            if tuple(path[:depth + 1]) != section[:depth + 1]:
                lines.append(f"{'  ' * depth}{name}:")
        section = tuple(path)
        lines.append(f"{'  ' * len(path)}{leaf}: {json.dumps(value)}   # {reproduces}")
    return "\n".join(lines) + "\n"


# ---- the import ------------------------------------------------------------------------------------------


def _wan_folder(wan_root: Path, part: str) -> Path:
    folder = wan_root / part
    if not folder.is_dir():
        raise FileNotFoundError(f"{wan_root}: not a Wan2.1 diffusers root (no {part}/)")
    return folder


def import_release(teacher_file: str | os.PathLike, wan_root: str | os.PathLike, out: str | os.PathLike,
                   student_file: str | os.PathLike | None = None) -> Path:
    """Convert the release's teacher (and student) files into `out` (see module doc), which appears
    complete or not at all."""
    from student.export import save_student
    from student.model import CausalStudent
    from teacher.files import atomic_folder, check_replaceable, write_atomic
    from teacher.model import NextShotTeacher

    root = Path(wan_root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{wan_root}: Wan2.1 diffusers root not found")
    config = _wan_folder(root, "transformer")
    if not (config / "config.json").is_file():
        raise FileNotFoundError(f"{config}: no config.json: not a Wan2.1 diffusers root")
    sources = [Path(teacher_file)] + ([Path(student_file)] if student_file else [])
    for source in sources:
        if not source.is_file():
            raise FileNotFoundError(f"{source}: checkpoint file not found")
    if student_file:
        for part in ("vae", "text_encoder", "tokenizer"):
            _wan_folder(root, part)
    check_replaceable(out, inputs=[*sources, root])
    settings = teacher_settings()
    text = recipe_fragment(root, sources[0].resolve(), sources[1].resolve() if student_file else None)
    with atomic_folder(out) as tmp:
        NextShotTeacher(wan_transformer(teacher_file, config), **settings).save_pretrained(tmp / TEACHER)
        if student_file:
            base = NextShotTeacher(wan_transformer(student_file, config), **settings)
            student = CausalStudent.from_teacher(base, copy=False, **student_settings())
            save_student(student, tmp / STUDENT, release_components(root))
        write_atomic(tmp / RECIPE, text)
    return Path(out)
