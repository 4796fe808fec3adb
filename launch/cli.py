"""The `shotdistill` command line.

Each subcommand is declared here (its arguments) and implemented elsewhere (its handler, imported
lazily so that `shotdistill --help` and light commands do not pay for torch or DeepSpeed). Every
failure ends as one line on stderr and a non-zero exit; set SHOTDISTILL_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable


def _handler(path: str) -> Callable[[argparse.Namespace], int | None]:
    module, attr = path.split(":")
    return getattr(importlib.import_module(module), attr)


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a recipe (one stage or a pipeline) in this process")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    p.set_defaults(handler="launch.commands:run")


def _add_launch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("launch", help="run a recipe on N processes per node (torchrun)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--nproc", type=int, required=True, help="processes (GPUs) per node")
    p.add_argument("--nnodes", type=int, default=1, help="number of nodes")
    p.add_argument("--node-rank", type=int, default=0, help="rank of this node")
    p.add_argument("--master", default="127.0.0.1:29500", help="HOST:PORT of the rendezvous")
    p.set_defaults(handler="launch.torchrun:launch")


def _add_slurm(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("slurm", help="write an sbatch script that runs a recipe (srun + torchrun)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--partition")
    p.add_argument("--time", help="wall-clock limit, e.g. 48:00:00")
    p.add_argument("--account")
    p.add_argument("--out", help="script path (default: <run.out>/<run.name>/sbatch.sh)")
    p.set_defaults(handler="launch.slurm:write_script")


def _add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print a recipe resolved, or the documented schema")
    p.add_argument("recipe", nargs="?", help="recipe to resolve and print")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--docs", action="store_true", help="print every key with its default and doc")
    p.set_defaults(handler="launch.commands:config")


SUBCOMMANDS = [_add_run, _add_launch, _add_slurm, _add_config]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shotdistill",
        description="Distill a bidirectional video diffusion teacher into a causal streaming "
                    "multi-shot student (ShotStream).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = _handler(args.handler)(args)
    except KeyboardInterrupt:
        print("shotdistill: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place that turns failures into one line
        if os.environ.get("SHOTDISTILL_DEBUG"):
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"shotdistill: error: {message}", file=sys.stderr)
        return 1
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
