"""Handlers of `shotdistill data synth`, `data stories` and `data prepare` (one process each).

Both read their settings from a recipe (default: the packaged tiny prepare recipe) plus
`key=value` overrides, so the command line and `shotdistill run recipes/tiny/prepare.yaml` make
the same files from the same keys.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def default_recipe() -> Path:
    import recipes
    return Path(recipes.__file__).parent / "tiny" / "prepare.yaml"


def _load(args: argparse.Namespace, extra: list[str] = ()):
    from distill.config import load_recipe
    return load_recipe(args.recipe or default_recipe(), list(args.overrides) + list(extra))


def synth(args: argparse.Namespace) -> int:
    """Render the synthetic world: mp4 files, facts and manifest.jsonl in --out."""
    from distill.data.components import synth_settings
    from distill.data.synth import synthesize
    extra = [f"data.synth.{k}={v}" for k, v in (("videos", args.videos), ("seed", args.seed)) if v is not None]
    cfg = _load(args, extra)
    manifest = synthesize(args.out, synth_settings(cfg.data.synth))
    print(f"wrote {cfg.data.synth.videos} videos and {manifest}")
    return 0


def stories(args: argparse.Namespace) -> int:
    """Write held-out evaluation stories (captions + facts) of the recipe's world at --seed to --out."""
    from distill.data.components import synth_settings
    from distill.data.synth import story_lines
    from teacher.files import write_atomic
    cfg = _load(args, [f"data.synth.videos={args.count}", f"data.synth.seed={args.seed}"])
    write_atomic(Path(args.out), "\n".join(story_lines(synth_settings(cfg.data.synth), args.shots)) + "\n")
    print(f"wrote {args.count} stories of {args.shots} shots to {args.out}")
    return 0


def prepare(args: argparse.Namespace) -> int:
    """Decode, encode and shard the videos of MANIFEST into --out (resumable)."""
    import torch

    from distill.stages.prepare import check_report, prepare as run_prepare
    cfg = _load(args, [f"data.manifest={args.manifest}"])  # fills a recipe's mandatory data.manifest
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = run_prepare(cfg, args.manifest, args.out, device=device, progress=cfg.logging.progress)
    check_report(report, Path(args.out))
    return 0
