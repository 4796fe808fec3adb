"""Evaluation per stage: every listed stage of a run scored on the same prompts and seeds.

`eval.stages` lists stage folders of the run. A finished stage (its `DONE` marker) holding a student
(`student/generator.json`: causal-init, dmd-intra, dmd-inter) is exported for serving into
`<eval>/exports/<stage>/` (or the run's `export/` is reused when it was made from that stage after
it finished) and evaluated with `distill.eval.scoring.evaluate`; one holding a teacher (`model/`) is
evaluated with `distill.eval.makers.evaluate_teacher`. A stage whose export is the one the eval
stage already scored as the run's final student takes those numbers instead of generating again.
Anything else (no folder, not finished, neither kind) is skipped with the reason, never an error.
Each evaluated stage writes `<eval>/stages/<stage>/{report.json, samples/}`; `stages_table` is the
markdown table of them all (rows = stages, columns = metrics).
"""

from __future__ import annotations

from pathlib import Path

import torch

from distill.runner import DONE

STUDENT, TEACHER = "student", "teacher"
STAGES_FOLDER = "stages"
EXPORTS_FOLDER = "exports"


def stage_kind(run: Path, name: str) -> tuple[str | None, str | None]:
    """(STUDENT or TEACHER, None) for a finished stage folder of the run, else (None, why it is skipped)."""
    from distill.stages.export import STUDENT_FOLDER
    from distill.stages.teacher import MODEL_DIR
    from student.export import GENERATOR_FILE

    stage = run / name
    if not stage.is_dir():
        return None, f"no stage folder {stage}"
    if not (stage / DONE).is_file():
        return None, f"{stage} has not finished (no {DONE} marker)"
    if (stage / STUDENT_FOLDER / GENERATOR_FILE).is_file():
        return STUDENT, None
    if (stage / MODEL_DIR / "config.json").is_file():
        return TEACHER, None
    return None, f"{stage} holds neither a student ({STUDENT_FOLDER}/{GENERATOR_FILE}) nor a teacher ({MODEL_DIR}/)"


def export_stage(run: Path, export: Path) -> str | None:
    """The run's newest finished student stage when `export` (a folder the run exported) was written
    after that stage finished, so it holds that stage's student; else None."""
    from distill.stages.export import find_student_stage
    from student.export import GENERATOR_FILE

    try:
        newest = find_student_stage(run)
    except FileNotFoundError:
        return None
    made = export / GENERATOR_FILE
    if not made.is_file() or made.stat().st_mtime < (newest / DONE).stat().st_mtime:
        return None
    return newest.name


def stage_export(run: Path, name: str, work: Path) -> Path:
    """A serving export of stage `name`'s student: the run's export/ when it is that stage's, else made
    into `work`/exports/<name>/."""
    from distill.stages.export import export_run

    if export_stage(run, run / "export") == name:
        return run / "export"
    return export_run(run / name, work / EXPORTS_FOLDER / name)


def evaluate_stages(run: Path, names: list[str], prompts: list, out: Path, ev, device: str | torch.device,
                    seed: int, env, known: dict[str, dict[str, float]]) -> tuple[dict[str, dict], dict[str, str]]:
    """({stage: metrics} of the evaluated stages, {stage: why skipped}); `known` holds metrics already
    measured per stage (the final student's). Exports are made on rank 0; every rank generates its share."""
    from distill.distributed import broadcast_object
    from distill.eval.scoring import evaluate
    from distill.eval.makers import evaluate_teacher

    metrics, skipped = {}, {}
    for name in names:
        kind, why = stage_kind(run, name)
        if kind is None:
            skipped[name] = why
            continue
        if name in known:
            metrics[name] = known[name]
            continue
        folder = out / STAGES_FOLDER / name
        if kind == TEACHER:
            metrics[name] = evaluate_teacher(run / name, prompts, folder, ev, device, seed, env.rank, env.world_size)
            continue
        export = str(stage_export(run, name, out)) if env.is_main else None
        metrics[name] = evaluate(Path(broadcast_object(export)), prompts, folder, ev, device, seed, None,
                                 env.rank, env.world_size)
    return metrics, skipped


def stages_table(metrics: dict[str, dict[str, float]], skipped: dict[str, str]) -> str:
    """Markdown: one row per evaluated stage, one column per metric ("–" where a stage lacks one),
    then the skipped stages and why."""
    from distill.eval.compare import format_cell

    columns = list(dict.fromkeys(k for m in metrics.values() for k in m))
    lines = ["| stage | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(format_cell(m.get(k)) for k in columns) + " |"
              for name, m in metrics.items()]
    if not metrics:
        lines = ["No stage evaluated."]
    lines += [""] + [f"Skipped {name}: {why}." for name, why in skipped.items()] if skipped else []
    return "\n".join(lines) + "\n"
