"""Export a run's newest finished student for serving (`shotdistill export`, the export and eval stages).

A stage that trains a student declares `produces = "student"` and leaves a student folder
(student/folder.py) in its stage folder; the runner's DONE record says so. The newest finished one
(by when it finished) is exported, whatever the stage, or a stage folder named directly. The export
is the same student folder made self-contained: the component folders the stage referenced (the
Wan VAE, the UMT5 encoder and tokenizer) are copied in, and nothing else of a model root. It is also
a diffusers pipeline (student/pipeline.py) and carries a model card (README.md, `model_card`): the
base model, the run's finished stages, the student's settings and the run's evaluation table
(`<run>/eval/stages.md`) when the run has been evaluated; a pipeline recipe exports before it
evaluates, so `shotdistill export RUN` after the eval stage writes the card with the table.
"""

from __future__ import annotations

import json
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


def export_run(source: str | os.PathLike, out: str | os.PathLike, torch_dtype=None) -> Path:
    """Export the newest finished student of `source` (a run or stage folder) into `out`, its
    transformer in `torch_dtype` (default: as trained): a folder that may be replaced
    (teacher/files.py `check_replaceable`: absent, empty or one we wrote) and that is not, and does
    not contain, `source`, the student folder or a component folder it copies from."""
    from student.export import export_folder
    from student.folder import read_folder
    from teacher.files import check_replaceable

    stage = find_student(source)
    student = layout.product(stage, "student")
    components = [c["path"] for c in read_folder(student).components.values() if c.get("path")]
    check_replaceable(out, ours=(layout.GENERATOR_FILE,), inputs=[source, student, *components])
    return export_folder(student, out, torch_dtype=torch_dtype, card=model_card(stage, torch_dtype))


def verify_run_export(source: str | os.PathLike, export: str | os.PathLike, device: str = "cpu") -> dict[str, float]:
    """`student.export.verify_export` of `export` against the student it was made from: the newest
    finished student of `source` (a run or stage folder)."""
    from student.export import verify_export

    return verify_export(export, layout.product(find_student(source), "student"), device=device)


# ---- the model card ---------------------------------------------------------------------------------

def _stage_config(stage: Path) -> dict:
    """A stage folder's resolved recipe (config.yaml), {} when absent."""
    import yaml

    path = stage / layout.CONFIG
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _run_of(stage: Path) -> Path | None:
    """The run folder holding `stage`, or None for a stage folder outside a run."""
    return stage.parent if (stage.parent / layout.CONFIG).is_file() else None


def _base_model(config: dict) -> str:
    model = config.get("model")
    if model is None:
        return "not recorded (the stage folder's config.yaml has no model section)"
    if model.get("path"):
        return f"`{model['path']}`"
    return (f"a random Wan transformer (model.path empty: {model.get('layers')} layers, {model.get('heads')} heads "
            f"of width {model.get('head_dim')})")


def _stages_table(run: Path | None, stage: Path) -> str:
    """The run's finished stages, in the order they finished, the exported one marked."""
    folders = [p for p in run.iterdir() if p.is_dir()] if run else [stage]
    finished = sorted(((layout.done_record(p), p) for p in folders if layout.done_record(p) is not None),
                      key=lambda found: found[0].get("finished", 0.0))
    rows = ["| stage folder | stage | produces | wall time (s) |", "|---|---|---|---|"]
    for record, folder in finished:
        mark = " (exported)" if folder.resolve() == stage.resolve() else ""
        rows.append(f"| {folder.name}{mark} | {_stage_config(folder).get('stage', '?')} | "
                    f"{record.get('produces') or '-'} | {record.get('wall_s', '?')} |")
    return "\n".join(rows)


def _settings_table(stage: Path, torch_dtype) -> str:
    from student.folder import read_folder
    from student.sampling import denoising_timesteps

    info = read_folder(layout.product(stage, "student"))
    s, c = info.settings, info.components
    dtype = str(torch_dtype).removeprefix("torch.") if torch_dtype is not None else (info.dtype or "float32")
    rows = {
        "chunk_frames (latent frames per chunk)": s["chunk_frames"],
        "local_chunks (local cache, chunks)": s["local_chunks"],
        "local compression (pooling kernel per past chunk, newest first)": (
            ", ".join(str(k) for k in s.get("local_compression", [])) or "none"),
        "context_frames (global cache, frames)": f"{s['context_frames']} ({s['context_strategy']} context rule)",
        "indicator (shot boundary)": s["indicator"] + (f", theta {s['theta']:.4g}" if s["indicator"] == "rope_offset"
                                                       else ""),
        "captions / caption layout": f"{s['captions']} / {s['caption_layout']}",
        "denoising steps (before the shift)": ", ".join(f"{t:g}" for t in s["denoising_steps"]),
        "shift": s["shift"],
        "timesteps (after the shift)": ", ".join(f"{t:.1f}" for t in denoising_timesteps(s["denoising_steps"],
                                                                                         s["shift"])),
        "transformer dtype": dtype,
        "codec": json.dumps({k: v for k, v in c.get("codec", {}).items() if k != "path"}),
        "text encoder": json.dumps({k: v for k, v in c.get("text_encoder", {}).items() if k != "path"}),
        "video": json.dumps(c.get("video", {})),
        "LoRA adapter": "transformer_lora/ (peft; applies to the student the stage started from)"
                        if (layout.product(stage, "student") / "transformer_lora").is_dir() else "none",
    }
    return "\n".join(["| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows.items())])


def model_card(stage: Path, torch_dtype=None) -> str:
    """README.md of the export of `stage`'s student (see module doc)."""
    run = _run_of(stage)
    config = _stage_config(stage)
    table = run / layout.EVAL / "stages.md" if run else None
    evaluation = table.read_text().strip() if table and table.is_file() else (
        "Not evaluated yet: the run has no eval/stages.md. A pipeline recipe exports before it evaluates; run "
        "`shotdistill export RUN --out DIR` after the eval stage for a card with the table.")
    name = run.name if run else stage.name
    return f"""---
library_name: diffusers
pipeline_tag: text-to-video
tags: [shotstream, multi-shot, causal, streaming, distillation]
---

# {name}: a causal multi-shot streaming student

Distilled by shotdistill (ShotStream) from a bidirectional next-shot teacher; this folder is the
student of stage `{stage.name}`{f" of run `{name}`" if run else ""}. It generates a video shot by shot while
prompts arrive, chunk by chunk through a KV cache, each shot conditioned on the ones before it.

```python
from diffusers import DiffusionPipeline

# the pipeline class is shotdistill's (pip install shotdistill); pipeline.py here only imports it
pipe = DiffusionPipeline.from_pretrained("path/to/this/folder", trust_remote_code=True)
story = pipe(["wide: ...", "close-up: ..."], global_prompt="...", seed=0).frames   # uint8 [f, H, W, 3] per shot
session = pipe.stream(global_prompt="...", seed=0)       # or prompt by prompt:
for frames in session.next_shot("wide: ..."):          # frames of each chunk as soon as they exist
    ...
```

Or without diffusers: `shotdistill generate THIS_FOLDER --shot "..." --shot "..." --out story.mp4`.
The transformer folder is not a plain `WanTransformer3DModel` (its config is `causal_config.json`):
run as diffusers' bidirectional Wan it would ignore the shot positions, the context and the cache.

## Base model

{_base_model(config)}

## Stages

{_stages_table(run, stage)}

## Settings

{_settings_table(stage, torch_dtype)}

## Evaluation

{evaluation}
"""
