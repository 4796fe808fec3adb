"""`stage: eval`: score the run's final student export and, per `eval.stages`, every listed stage.

The final export is `eval.export`, else the run's `export/` folder, else the newest finished student
stage exported into this stage's folder (a run without one, e.g. a teacher-only ablation, evaluates
its `eval.stages` alone). Prompts are `eval.prompts` or the run's prepared records
(the first `eval.videos`); rank r generates prompts r, r + world, ... on its own device (so the
timings are one device's), rank 0 gathers and reports. Each stage of `eval.stages` (teacher,
causal-init, dmd-intra, dmd-inter) is scored on the same prompts and seeds (distill/eval/stages.py);
unfinished or absent ones are skipped with the reason. Products: `samples/*.mp4` and `report.json`
(the final student's, plus `stages`: each evaluated stage's report and each skipped stage's reason),
`stages/<stage>/`, `exports/<stage>/`, `stages.md` (rows = stages, columns = metrics), TensorBoard
scalars `eval/<metric>` and `eval/<stage>/<metric>`, and the metrics the runner writes to
`metrics.json`: the final student's under their own names, every stage's as `<stage>/<metric>`.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

EMPTY_STAGES = "eval.stages is empty: only the final student is evaluated"


def check_eval(ev: DictConfig, source: str = "recipe") -> None:
    """The eval section's values, before any compute."""
    if ev.videos < 0 or ev.cut_window < 1 or ev.cut_tolerance < 0 or ev.features.batch < 1:
        raise ValueError(f"{source}: eval.videos and eval.cut_tolerance must be >= 0, eval.cut_window "
                         "and eval.features.batch >= 1")
    if ev.cut_ratio <= 0 or ev.cut_min_change <= 0 or ev.motion_tolerance <= 0:
        raise ValueError(f"{source}: eval.cut_ratio, eval.cut_min_change and eval.motion_tolerance must be > 0")
    if ev.features.kind != "none" and not ev.features.path:
        raise ValueError(f"{source}: eval.features.path is required when eval.features.kind is {ev.features.kind}")
    stages = list(ev.stages)
    bad = [s for s in stages if not s or "/" in s or s.startswith(".")]
    if bad or len(set(stages)) < len(stages):
        raise ValueError(f"{source}: eval.stages must be distinct stage folder names; got {stages}")


class EvalStage:
    """Evaluate the run's final student and its listed stages (see module doc)."""

    folder = "eval"

    @staticmethod
    def check(cfg: DictConfig) -> None:
        """Fail on bad `eval.*` values before any stage runs."""
        check_eval(cfg.eval)

    def __init__(self, cfg: DictConfig, ctx) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.summary_table: str | None = None  # the runner's end-of-run summary prints it

    def run(self) -> dict[str, float]:
        """Every rank generates and scores its share of the prompts; rank 0 returns the metrics."""
        from distill.data.components import prepared_dir
        from distill.eval.scoring import evaluate, select_prompts
        from distill.eval.stages import evaluate_stages

        cfg, env, out = self.cfg, self.ctx.env, Path(self.ctx.stage_dir)
        prompts = select_prompts(cfg.eval, prepared_dir(cfg))
        export, why = self._export()
        final, known = {}, {}
        if export is not None:
            final = evaluate(export, prompts, out, cfg.eval, env.device, cfg.run.seed, None, env.rank,
                             env.world_size)
            known = {name: final for name in [self._final_stage(export)] if name}
        elif env.is_main:  # a run without a student (a teacher-only ablation): its stages alone
            from distill.checkpoint import write_atomic
            out.mkdir(parents=True, exist_ok=True)
            write_atomic(out / "report.json", json.dumps({"export": None, "no_export": why}, indent=2) + "\n")
        per_stage, skipped = evaluate_stages(self.ctx.run_dir, list(cfg.eval.stages), prompts, out, cfg.eval,
                                             env.device, cfg.run.seed, env, known)
        metrics = {**final, **{f"{s}/{k}": v for s, m in per_stage.items() for k, v in m.items()}}
        if env.is_main:
            self._report(out, per_stage, skipped, known, metrics)
        return metrics

    def _report(self, out: Path, per_stage: dict, skipped: dict, known: dict, metrics: dict) -> None:
        """stages.md, the `stages` entry of report.json and the TensorBoard scalars (rank 0)."""
        from distill.checkpoint import write_atomic
        from distill.eval.scoring import log_scalars
        from distill.eval.stages import STAGES_FOLDER, stages_table

        self.summary_table = stages_table(per_stage, skipped) if self.cfg.eval.stages else EMPTY_STAGES + "\n"
        write_atomic(out / "stages.md", self.summary_table)
        report = json.loads((out / "report.json").read_text())
        report["stages"] = {
            "evaluated": {s: "report.json" if s in known else f"{STAGES_FOLDER}/{s}/report.json" for s in per_stage},
            "skipped": skipped if self.cfg.eval.stages else {"*": EMPTY_STAGES}}
        write_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
        if self.cfg.logging.tensorboard:
            log_scalars(self.ctx.tb_dir, metrics)

    def _export(self) -> tuple[Path | None, str | None]:
        """(`eval.export`, or the one rank 0 finds or makes in the run, None); with `eval.stages` set, a
        run without a finished student gives (None, why) instead of failing."""
        from distill.distributed import broadcast_object
        from distill.eval.scoring import resolve_export

        if self.cfg.eval.export:
            return Path(self.cfg.eval.export), None
        found = None
        if self.ctx.env.is_main:
            try:
                found = (str(resolve_export(self.ctx.run_dir, self.ctx.stage_dir)), None)
            except FileNotFoundError as e:
                if not self.cfg.eval.stages:
                    raise
                found = (None, str(e))
        path, why = broadcast_object(found)
        return (Path(path) if path else None), why

    def _final_stage(self, export: Path) -> str | None:
        """The run stage whose student the final export holds (None for a given `eval.export`)."""
        from distill.distributed import broadcast_object
        from distill.eval.stages import export_stage

        if self.cfg.eval.export:
            return None
        return broadcast_object(export_stage(self.ctx.run_dir, export) if self.ctx.env.is_main else None)
