"""Handlers of `shotdistill run` and `shotdistill config`."""

from __future__ import annotations

import argparse
import os
import sys


def run(args: argparse.Namespace) -> int:
    """Run a recipe (one stage or a pipeline) in this process, or as one torchrun worker. A stop signal
    during training saves a checkpoint and exits 128 + the signal (SIGTERM 143, Ctrl-C 130), so
    `run a && run b` stops there and a scheduler sees the job did not complete."""
    from distill.runner import run_recipe
    from distill.trainer import Preempted
    from launch.cli import rank_tag
    try:
        run_recipe(args.recipe, args.overrides)
    except Preempted as e:
        if os.environ.get("RANK", "0") == "0":  # every rank stops alike: one line
            print(f"shotdistill: {rank_tag()}{e}", file=sys.stderr)
        return 128 + e.signum
    return 0


def config(args: argparse.Namespace) -> int:
    """Print the resolved recipe, every schema key with its default and doc (--docs), or the
    registered stages (--stages)."""
    from distill.config import key_docs, load_recipe, to_yaml
    if args.docs:
        rows = key_docs()
        width = max(len(k) for k, _, _ in rows)
        for full_key, default, doc in rows:
            print(f"{full_key:<{width}}  {default!s:<12}  {doc}")
        return 0
    if args.stages:
        from distill.stages import REGISTRY
        for name, path in sorted(REGISTRY.items()):
            print(f"{name:<16}  {path}")
        return 0
    if not args.recipe:
        raise ValueError("config: give a RECIPE to resolve, --docs or --stages")
    print(to_yaml(load_recipe(args.recipe, args.overrides)), end="")
    return 0
