"""The eval stage's HParams session: the keys of the stages it scores.

Every stage's TensorBoard folder is one HParams session holding its resolved recipe
(distill/logging.py `write_run_info`), so the HParams tab sorts that stage's scalars by any key. The
eval's own recipe says little about what it scores: an ablation is evaluated with
`recipes/tiny/eval.yaml run.name=<ablation>`, whose `student.*` and `data.context.*` are the
schema's defaults, not the values the ablation trained with. So the eval's session carries the keys
of the stages it scores, under their own names: one HParams column (`student.indicator`,
`data.context.strategy`) then holds every session's value, the training stages' and the evals',
and sorts the eval metrics of many runs by it. (Prefixing each stage's keys would keep every
stage's value apart, but in columns no other session has, four times as many.)

`evaluated_hparams`: the eval recipe's keys, overlaid by the recorded recipe (`<stage>/config.yaml`)
of each stage it scores, oldest finished first, so the newest stage's value wins (a dmd-inter's
over the causal-init it started from); `stage`, `run.*` and `eval.*` stay the eval recipe's (this
evaluation's prompts, seed and thresholds). The stages scored are the finished model stages of
`eval.stages` and, unless `eval.export` names the final student, the run's newest finished student
stage.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from distill import layout
from distill.eval.stages import STUDENT, stage_kind
from distill.logging import recipe_hparams

OWN_SECTIONS = ("run.", "eval.")  # with `stage`: the keys that describe the evaluation itself


def scored_stages(cfg: DictConfig, run_dir: Path) -> list[Path]:
    """The stage folders an eval of `cfg` scores in `run_dir` (see module doc), oldest finished first."""
    folders = [run_dir / name for name in cfg.eval.stages if stage_kind(run_dir, name)[0] is not None]
    newest = None if cfg.eval.export else layout.newest_product(run_dir, STUDENT)
    if newest is not None and newest not in folders:
        folders.append(newest)
    return sorted(folders, key=_finished)


def evaluated_hparams(cfg: DictConfig, run_dir: Path) -> dict[str, bool | int | float | str]:
    """The eval session's HParams (see module doc)."""
    merged = recipe_hparams(cfg)
    for stage in scored_stages(cfg, Path(run_dir)):
        if (stage / layout.CONFIG).is_file():  # a stage the runner ran records its recipe
            keys = recipe_hparams(OmegaConf.load(stage / layout.CONFIG))
            merged.update({k: v for k, v in keys.items() if k != "stage" and not k.startswith(OWN_SECTIONS)})
    return merged


def _finished(stage: Path) -> float:
    record = layout.done_record(stage) or {}
    return record.get("finished", (stage / layout.DONE).stat().st_mtime)
