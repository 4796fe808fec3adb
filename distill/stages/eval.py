"""`stage: eval`: generate the evaluation prompts with the run's newest student export and score them.

The export is `eval.export`, else the run's `export/` folder, else the newest finished student stage
exported into this stage's folder. Prompts are `eval.prompts` or the run's prepared records (the
first `eval.videos`); rank r generates prompts r, r + world, ... on its own device (so the timings
are one device's), rank 0 gathers and reports. Products: `samples/*.mp4`, `report.json` (per video,
and which metrics were skipped and why), TensorBoard scalars `eval/<name>`, and the averaged
metrics, which the runner writes to `metrics.json` (distill/evaluation.py, distill/metrics.py)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


def check_eval(ev: DictConfig, source: str = "recipe") -> None:
    """The eval section's values, before any compute."""
    if ev.videos < 0 or ev.cut_window < 1 or ev.cut_tolerance < 0 or ev.features.batch < 1:
        raise ValueError(f"{source}: eval.videos and eval.cut_tolerance must be >= 0, eval.cut_window "
                         "and eval.features.batch >= 1")
    if ev.cut_ratio <= 0 or ev.cut_min_change <= 0 or ev.motion_tolerance <= 0:
        raise ValueError(f"{source}: eval.cut_ratio, eval.cut_min_change and eval.motion_tolerance must be > 0")
    if ev.features.kind != "none" and not ev.features.path:
        raise ValueError(f"{source}: eval.features.path is required when eval.features.kind is {ev.features.kind}")


class EvalStage:
    """Evaluate the run's newest student export (see module doc)."""

    folder = "eval"

    @staticmethod
    def check(cfg: DictConfig) -> None:
        """Fail on bad `eval.*` values before any stage runs."""
        check_eval(cfg.eval)

    def __init__(self, cfg: DictConfig, ctx) -> None:
        self.cfg, self.ctx = cfg, ctx

    def run(self) -> dict[str, float]:
        """Every rank generates and scores its share of the prompts; rank 0 returns the means."""
        from distill.data.components import prepared_dir
        from distill.evaluation import evaluate, select_prompts

        cfg, env = self.cfg, self.ctx.env
        prompts = select_prompts(cfg.eval, prepared_dir(cfg))
        tb = self.ctx.tb_dir if cfg.logging.tensorboard else None
        return evaluate(self._export(), prompts, self.ctx.stage_dir, cfg.eval, env.device, cfg.run.seed, tb,
                        env.rank, env.world_size)

    def _export(self) -> Path:
        """`eval.export`, or the one rank 0 finds (or makes) in the run."""
        from distill.distributed import broadcast_object
        from distill.evaluation import resolve_export

        if self.cfg.eval.export:
            return Path(self.cfg.eval.export)
        found = resolve_export(self.ctx.run_dir, self.ctx.stage_dir) if self.ctx.env.is_main else None
        return Path(broadcast_object(str(found) if found else None))
