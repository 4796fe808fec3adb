"""`stage: eval`: score the run's final student export and, per `eval.stages`, every listed stage.

The final export is `eval.export`, else the run's `export/` folder, else the newest finished student
stage exported into this stage's folder (a run without one, e.g. a teacher-only ablation, evaluates
its `eval.stages` alone). Prompts are `eval.prompts` or the run's prepared records
(the first `eval.videos`); rank r generates prompts r, r + world, ... on its own device (so the
timings are one device's), rank 0 gathers and reports. Each stage of `eval.stages` (teacher,
causal-init, dmd-intra, dmd-inter) is scored on the same prompts and seeds (distill/eval/stages.py
`evaluate_run`, which `shotdistill eval RUN` runs too);
unfinished or absent ones are skipped with the reason. Products: `samples/*.mp4` and `report.json`
(the final student's, plus `stages`: each evaluated stage's report and each skipped stage's reason),
`stages/<stage>/`, `exports/<stage>/`, `stages.md` (rows = stages, columns = metrics), TensorBoard
scalars `eval/<metric>` and `eval/<stage>/<metric>`, `strips/story_<i>.png` (and their TensorBoard
images), and the metrics the runner writes to `metrics.json`: the final student's under their own
names, every stage's as `<stage>/<metric>`. The stage's HParams session carries the keys of the
stages it scores (distill/eval/hparams.py), so the HParams tab sorts eval metrics by training axes.
"""

from __future__ import annotations

from omegaconf import DictConfig

from distill import layout


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

    folder = layout.EVAL
    reads = ("eval", "data.prepared")

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
        from distill.eval.prompts import select_prompts
        from distill.eval.run import EvalRun
        from distill.eval.stages import evaluate_run

        cfg, ctx = self.cfg, self.ctx
        self._session()
        prompts = select_prompts(cfg.eval, prepared_dir(cfg))
        run = EvalRun.of(ctx.env, cfg.run.seed, cfg.eval, out=ctx.stage_dir,
                         tb_dir=ctx.tb_dir if cfg.logging.tensorboard else None)
        metrics, self.summary_table = evaluate_run(ctx.run_dir, prompts, run)
        return metrics

    def _session(self) -> None:
        """The HParams session of the scored stages' keys, in place of the one the runner started
        with the eval recipe's (rank 0, TensorBoard on)."""
        from distill.eval.hparams import evaluated_hparams
        from distill.logging import write_run_info

        cfg, ctx = self.cfg, self.ctx
        if ctx.env.is_main and cfg.logging.tensorboard:
            hparams = evaluated_hparams(cfg, ctx.run_dir)
            write_run_info(ctx.tb_dir, cfg, main=True, hparams=hparams, replace=True)
