"""`shotdistill launch`: validate the recipe here, then become torchrun running `shotdistill run`.

The process replaces itself with torchrun (exec), so a scheduler's signals reach torchrun (which
forwards them to the workers) and the exit status is torchrun's: non-zero when any rank failed.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_master(master: str) -> tuple[str, int]:
    """'HOST:PORT' → (host, port), with a one-line error naming the flag."""
    host, sep, port = master.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--master {master!r}: expected HOST:PORT")
    return host, int(port)


def torchrun_argv(args: argparse.Namespace) -> list[str]:
    """The torchrun command line that starts `--nproc` workers on this node."""
    if args.nproc < 1 or args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        raise ValueError(f"launch: need --nproc >= 1, --nnodes >= 1 and 0 <= --node-rank < "
                         f"--nnodes (got {args.nproc}, {args.nnodes}, {args.node_rank})")
    host, port = parse_master(args.master)
    return [sys.executable, "-m", "torch.distributed.run",
            f"--nproc_per_node={args.nproc}", f"--nnodes={args.nnodes}",
            f"--node_rank={args.node_rank}", f"--master_addr={host}", f"--master_port={port}",
            "-m", "launch.cli", "run", args.recipe, *args.overrides]


def launch(args: argparse.Namespace) -> int:
    """Validate the whole recipe tree once (one clear error, not one per rank), then exec."""
    from distill.runner import plan
    plan(args.recipe, list(args.overrides))
    argv = torchrun_argv(args)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)
    return 1  # not reached
