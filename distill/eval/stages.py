"""Evaluation of a run: its final student and every stage of `eval.stages`, on the same prompts and seeds.

`evaluate_run` is the one code path of the eval stage and of `shotdistill eval RUN`. The final student
is `eval.export` (or the export given), else the run's `export/` folder, else the run's newest
finished student stage exported into the output folder (`resolve_export`); a run without one (a
teacher-only ablation) evaluates its `eval.stages` alone. It is scored into the output folder.

`eval.stages` lists stage folders of the run. A finished stage (its `DONE` marker) holding a student
(`student/generator.json`: causal-init, dmd-intra, dmd-inter) is exported for serving into
`<eval>/exports/<stage>/` (or the run's `export/` is reused when it was made from that stage after
it finished) and scored as a student export (distill/eval/makers.py); one holding a teacher
(`model/`) is scored as the teacher sampling shot by shot. A stage whose export is the one already
scored as the run's final student takes those numbers instead of generating again. Anything else
(no folder, not finished, neither kind) is skipped with the reason, never an error. Each evaluated
stage writes `<eval>/stages/<stage>/{report.json, samples/}`.

Rank 0 then writes `stages.md` (`stages_table`: rows = stages, columns = metrics), adds a `stages`
entry to the final report.json (each evaluated stage's report, each skipped stage's reason) and,
with a TensorBoard folder, the scalars `eval/<metric>` and `eval/<stage>/<metric>`; last, a PNG strip
per story under `strips/` (each evaluated model's frames in a row: distill/eval/strips.py), also in
TensorBoard beside each model's story GIF. The metrics returned are the final student's under their
own names and every stage's as `<stage>/<metric>`.
"""

from __future__ import annotations

import json
from pathlib import Path

from distill.eval.prompts import Prompt
from distill.eval.run import EvalRun
from distill import layout

STUDENT, TEACHER = "student", "teacher"
STAGES_FOLDER = "stages"
EXPORTS_FOLDER = "exports"
EMPTY_STAGES = "eval.stages is empty: only the final student is evaluated"


def stage_kind(run_dir: Path, name: str) -> tuple[str | None, str | None]:
    """(STUDENT or TEACHER, None) for a finished stage folder of the run, else (None, why it is skipped)."""
    stage = run_dir / name
    if not stage.is_dir():
        return None, f"no stage folder {stage}"
    record = layout.done_record(stage)
    if record is None:
        return None, f"{stage} has not finished (no {layout.DONE} marker)"
    if record.get("produces") in (STUDENT, TEACHER):
        return record["produces"], None
    return None, f"{stage} produces neither a student nor a teacher (it produces {record.get('produces')})"


def export_stage(run_dir: Path, export: Path) -> str | None:
    """The run's newest finished student stage when `export` (a folder the run exported) was written
    after that stage finished, so it holds that stage's student; else None."""
    newest = layout.newest_product(run_dir, STUDENT)
    if newest is None:
        return None
    made = export / layout.GENERATOR_FILE
    if not made.is_file() or made.stat().st_mtime < (newest / layout.DONE).stat().st_mtime:
        return None
    return newest.name


def stage_export(run_dir: Path, name: str, work: Path) -> Path:
    """A serving export of stage `name`'s student: the run's export/ when it is that stage's, else made
    into `work`/exports/<name>/."""
    from distill.export import export_run

    if export_stage(run_dir, run_dir / layout.EXPORT) == name:
        return run_dir / layout.EXPORT
    return export_run(run_dir / name, work / EXPORTS_FOLDER / name)


def resolve_export(source: str | Path, work: str | Path) -> Path:
    """The export to evaluate: `source` itself when it is one, else the run folder's export/, else
    the run's newest finished student exported into `work`/export."""
    from distill.export import export_run

    source = Path(source)
    for folder in (source, source / layout.EXPORT):
        if (folder / layout.GENERATOR_FILE).is_file():
            return folder
    Path(work).mkdir(parents=True, exist_ok=True)
    return export_run(source, Path(work) / layout.EXPORT)


def final_export(run_dir: Path | None, run: EvalRun, export: str | Path | None = None
                 ) -> tuple[Path | None, str | None, str | None]:
    """(final student export, the run stage it holds, why there is none) on every rank: `export`, else
    `eval.export` (neither names a stage), else the one rank 0 finds or makes in the run (see
    `resolve_export`). With `eval.stages` set, a run without a finished student gives (None, None, why)."""
    from distill.distributed import broadcast_object

    export = export or run.ev.export
    if export:
        return Path(export), None, None
    found = None
    if run.is_main:
        try:
            path = resolve_export(run_dir, run.out)
            found = (str(path), export_stage(run_dir, path), None)
        except FileNotFoundError as e:
            if not run.ev.stages:
                raise
            found = (None, None, str(e))
    path, stage, why = broadcast_object(found)
    return (Path(path) if path else None), stage, why


def evaluate_stages(run_dir: Path, prompts: list[Prompt], run: EvalRun,
                    known: dict[str, dict[str, float]]) -> tuple[dict[str, dict], dict[str, str]]:
    """({stage: metrics} of the evaluated stages of `eval.stages`, {stage: why skipped}); `known` holds
    metrics already measured per stage (the final student's). Exports are made on rank 0; every rank
    generates its share."""
    from distill.distributed import broadcast_object
    from distill.eval.makers import load_student_maker, load_teacher_maker
    from distill.eval.scoring import score_videos

    metrics, skipped = {}, {}
    for name in run.ev.stages:
        kind, why = stage_kind(run_dir, name)
        if kind is None:
            skipped[name] = why
            continue
        if name in known:
            metrics[name] = known[name]
            continue
        folder = run.into(run.out / STAGES_FOLDER / name)
        if kind == TEACHER:
            maker = load_teacher_maker(run_dir / name, run.device, run.ev.dtype)
        else:
            export = str(stage_export(run_dir, name, run.out)) if run.is_main else None
            maker = load_student_maker(Path(broadcast_object(export)), run.device, run.ev.dtype)
        metrics[name] = score_videos(maker, prompts, folder)
    return metrics, skipped


def evaluate_run(run_dir: Path | None, prompts: list[Prompt], run: EvalRun,
                 export: str | Path | None = None) -> tuple[dict[str, float], str | None]:
    """Score the final student and every stage of `eval.stages` into run.out (see module doc);
    `run_dir` None: `export` alone, no stages. Returns (metrics, the stages.md text) on rank 0,
    ({}, None) elsewhere."""
    from distill.eval.makers import load_student_maker
    from distill.eval.scoring import score_videos
    from distill.eval.strips import write_strips
    from teacher.files import write_atomic

    if run_dir is None and run.ev.stages:
        raise ValueError(f"{export}: eval.stages needs a run folder, not an export")
    path, stage, why = final_export(run_dir, run, export)
    final, known = {}, {}
    if path is not None:
        final = score_videos(load_student_maker(path, run.device, run.ev.dtype), prompts, run)
        known = {stage: final} if stage else {}
    elif run.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        write_atomic(run.out / "report.json", json.dumps({"export": None, "no_export": why}, indent=2) + "\n")
    per_stage, skipped = evaluate_stages(run_dir, prompts, run, known) if run_dir is not None else ({}, {})
    metrics = {**final, **{f"{s}/{k}": v for s, m in per_stage.items() for k, v in m.items()}}
    if not run.is_main:
        return metrics, None
    table = _report(run, per_stage, skipped, known, metrics)
    write_strips(run.out, run.tb_dir)  # after _report: it reads the evaluated stages off report.json
    return metrics, table


def _report(run: EvalRun, per_stage: dict, skipped: dict, known: dict, metrics: dict) -> str:
    """stages.md, the `stages` entry of report.json and the TensorBoard scalars (rank 0); the table."""
    from distill.logging import log_once
    from teacher.files import write_atomic

    listed = bool(run.ev.stages)
    table = stages_table(per_stage, skipped) if listed else EMPTY_STAGES + "\n"
    write_atomic(run.out / "stages.md", table)
    report = json.loads((run.out / "report.json").read_text())
    report["stages"] = {
        "evaluated": {s: "report.json" if s in known else f"{STAGES_FOLDER}/{s}/report.json" for s in per_stage},
        "skipped": skipped if listed else {"*": EMPTY_STAGES}}
    write_atomic(run.out / "report.json", json.dumps(report, indent=2) + "\n")
    if run.tb_dir is not None:  # eval/<name> at step 1; a re-evaluation into the folder replaces the points
        log_once(run.tb_dir, "eval", 1, metrics, main=True, replace=True)
    return table


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
