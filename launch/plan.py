"""Handler of `shotdistill plan`: the memory plan per GPU of every stage of a recipe tree (estimates)."""

from __future__ import annotations

import argparse


def plan(args: argparse.Namespace) -> int:
    """Print, per stage, each model's weights, gradients and optimizer states, the activations with and
    without gradient checkpointing, and whether it fits (distill/memory.py)."""
    from distill.memory import format_plan, parse_bytes, plan_stage
    from distill.runner import _stages
    from distill.runner import plan as plan_tree

    if args.gpus < 1 or args.gpus_per_node < 1:
        raise ValueError("plan: --gpus and --gpus-per-node must be >= 1")
    memory = parse_bytes(args.gpu_memory)
    root = plan_tree(args.recipe, args.overrides)
    plans = [plan_stage(n.folder, n.cfg, str(n.path), args.gpus, args.gpus_per_node) for n in _stages(root)]
    print(format_plan(plans, args.recipe, args.gpus, args.gpus_per_node, memory))
    return 0
