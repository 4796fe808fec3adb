"""Handlers of `shotdistill eval` and `shotdistill compare`.

`eval EXPORT_OR_RUN`: with a run folder, the recipe is the run's (its `eval/config.yaml` when the eval
stage ran, else `config.yaml`), the prompts default to its prepared records, and the run is evaluated
as the eval stage does it (the same function): its final student and every stage of `eval.stages`,
with `stages.md`; the outputs go to `<run>/eval/` (+ TensorBoard `<run>/tb/eval/`), where `compare`
finds them. With an export folder, `--prompts` is required, the `eval.*` keys are the schema's
defaults (no `eval.stages`), and outputs go to `<export>-eval/`. `key=value` overrides (e.g.
`eval.features.kind=dino`) apply in both cases.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from distill import layout


def _run_config(run: Path, overrides: list[str]):
    from distill.config import load_recipe

    stage = run / layout.EVAL / layout.CONFIG
    return load_recipe(stage if stage.is_file() else run / layout.CONFIG, overrides)


def _export_config(overrides: list[str]):
    """The schema's defaults with the overrides (an export carries no recipe)."""
    import tempfile

    from distill.config import load_recipe

    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp, "eval.yaml")
        recipe.write_text("stage: eval\nrun:\n  name: eval\n")
        return load_recipe(recipe, overrides)


def evaluate(args: argparse.Namespace) -> int:
    """Generate, time and score the prompts with an export, or a run's final student and its
    `eval.stages` (the eval stage's code path: distill/eval/stages.py `evaluate_run`)."""
    import torch

    from distill.eval.hparams import evaluated_hparams
    from distill.eval.prompts import select_prompts
    from distill.eval.run import EvalRun
    from distill.eval.stages import evaluate_run
    from distill.logging import write_run_info
    from distill.stages.eval import check_eval
    from launch.serve import quiet_loading
    from teacher.files import write_atomic

    source = Path(args.source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: export or run folder not found")
    is_run = (source / layout.CONFIG).is_file()
    if not is_run and not args.prompts:
        raise ValueError(f"{source}: not a run folder (no config.yaml): give --prompts FILE")
    overrides = list(args.overrides) + ([f"eval.prompts={args.prompts}"] if args.prompts else []) + \
        ([f"eval.videos={args.videos}"] if args.videos is not None else [])
    cfg = _run_config(source, overrides) if is_run else _export_config(overrides)
    check_eval(cfg.eval, str(source))
    out = Path(args.out) if args.out else source / layout.EVAL if is_run else source.parent / f"{source.name}-eval"
    prompts = select_prompts(cfg.eval, Path(cfg.data.prepared) if cfg.data.prepared else source / layout.PREPARE)
    quiet_loading()
    tb = layout.tb_dir(source, layout.EVAL) if is_run and not args.out else out / layout.TB
    seed = cfg.run.seed if args.seed is None else args.seed
    run = EvalRun(torch.device(args.device), seed, ev=cfg.eval, out=out, tb_dir=tb)
    if is_run and cfg.logging.tensorboard:
        # the same HParams session as the eval stage's: the scored stages' keys, so runs sort by axis
        write_run_info(tb, cfg, main=True, hparams=evaluated_hparams(cfg, source), replace=True)
    metrics, table = evaluate_run(source if is_run else None, prompts, run, export=None if is_run else source)
    write_atomic(out / layout.METRICS, json.dumps(metrics, indent=2) + "\n")
    report = json.loads((out / "report.json").read_text())
    for name, value in metrics.items():
        print(f"{name:<20} {value:.4g}")
    for name, why in report.get("skipped", {}).items():
        print(f"{name:<20} skipped: {why}")
    if cfg.eval.stages:
        print(table, end="")
    print(f"wrote {out / 'metrics.json'} ({len(prompts)} videos under {out / 'samples'})")
    return 0


def compare(args: argparse.Namespace) -> int:
    """Print (and with --out write) the markdown table of the runs' final numbers."""
    from distill.eval.compare import comparison_table
    from teacher.files import write_atomic

    table = comparison_table(args.runs)
    print(table, end="")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(args.out), table)
    return 0
