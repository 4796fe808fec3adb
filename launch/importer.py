"""Handler of `shotdistill import`: start from released checkpoints (distill/official.py)."""

from __future__ import annotations

import argparse


def shotstream(args: argparse.Namespace) -> int:
    """Convert the official ShotStream teacher (and causal student) files into --out."""
    from distill.official import RECIPE, STUDENT, TEACHER, import_release
    from launch.serve import quiet_loading

    quiet_loading()
    out = import_release(args.teacher, args.wan, args.out, student_file=args.student)
    written = [f"{TEACHER}/", *([f"{STUDENT}/"] if args.student else []), RECIPE]
    print(f"imported the ShotStream release into {out}: {', '.join(written)}")
    return 0
