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


EXPORT_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


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
    p.add_argument("--stages", action="store_true", help="print the registered stage names")
    p.set_defaults(handler="launch.commands:config")


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="make data: the synthetic world, latent shards")
    data = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    s = data.add_parser("synth", help="render the synthetic multi-shot world as mp4 files + manifest")
    s.add_argument("--out", required=True, help="folder for the videos, facts and manifest.jsonl")
    s.add_argument("--videos", type=int, help="number of videos (data.synth.videos)")
    s.add_argument("--seed", type=int, help="world seed (data.synth.seed)")
    s.add_argument("--recipe", help="recipe whose data.synth keys apply (default: tiny prepare)")
    s.add_argument("overrides", nargs="*", metavar="key=value")
    s.set_defaults(handler="launch.data:synth")
    t = data.add_parser("stories", help="write held-out evaluation stories (captions + facts) of the world")
    t.add_argument("--out", required=True, help="the JSONL file to write (eval.prompts)")
    t.add_argument("--seed", type=int, required=True, help="a world seed the training data does not use")
    t.add_argument("--count", type=int, default=4, help="number of stories")
    t.add_argument("--shots", type=int, default=5, help="shots per story")
    t.add_argument("--recipe", help="recipe whose data.synth keys apply (default: tiny prepare)")
    t.add_argument("overrides", nargs="*", metavar="key=value")
    t.set_defaults(handler="launch.data:stories")
    r = data.add_parser("prepare", help="decode, encode and shard the videos of a manifest")
    r.add_argument("manifest", help="manifest.jsonl (paths relative to it)")
    r.add_argument("--out", required=True, help="folder of the shards, index.json and report.json")
    r.add_argument("--recipe", help="recipe whose data/codec/text_encoder keys apply (default: tiny)")
    r.add_argument("overrides", nargs="*", metavar="key=value")
    r.set_defaults(handler="launch.data:prepare")


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a run's newest finished student for serving")
    p.add_argument("source", metavar="RUN_DIR", help="run folder (or one student stage's folder)")
    p.add_argument("--out", required=True, help="export folder: a student folder (transformer/, components, "
                   "generator.json) that is also a diffusers pipeline (model_index.json), with a model card")
    p.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), help="dtype of the exported transformer's weights, "
                   "which loads in it (default: as trained)")
    p.add_argument("--verify", action="store_true", help="then generate a 2-shot story with the export (through "
                   "diffusers) and with the trained student, and fail unless they agree")
    p.add_argument("--device", default="cpu", help="torch device of --verify, e.g. cuda")
    p.set_defaults(handler="launch.serve:export")


def _add_compile(p: argparse.ArgumentParser) -> None:
    # the generator checks the value (student/compiled.py MODES): importing it here would load torch for --help
    p.add_argument("--compile", default="none", metavar="MODE",
                   help="how the per-chunk passes run: none (eager), regions, compile, cudagraph (CUDA)")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a multi-shot video from an export, shot by shot")
    p.add_argument("export", metavar="EXPORT_DIR", help="folder written by `shotdistill export`")
    p.add_argument("--shot", action="append", metavar="TEXT", help="a shot's prompt (repeat, in order)")
    p.add_argument("--shots", metavar="FILE", help="a file of shot prompts, one per line")
    p.add_argument("--interactive", action="store_true",
                   help="after the given shots, read each next prompt from stdin (empty line ends)")
    p.add_argument("--out", required=True, help="mp4 file to write")
    p.add_argument("--frames", type=int, help="frames per shot (default: the export's training shot length)")
    p.add_argument("--global-prompt", default="", help="caption of the whole video, joined to every shot's")
    p.add_argument("--seed", type=int, default=0, help="seed of the generation noise")
    p.add_argument("--reference", action="append", metavar="IMAGE:CAPTION",
                   help="a reference image (any Pillow format, resized to the video size) shown with CAPTION "
                        "in the global cache before the history (repeat; split at the first ':')")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    _add_compile(p)
    p.set_defaults(handler="launch.serve:generate")


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from serve.limits import Limits  # no torch: the defaults live with the limits they set

    p = sub.add_parser("serve", help="serve an export: sessions stream their shots over WebSockets, with a web page")
    p.add_argument("export", metavar="EXPORT_DIR", help="folder written by `shotdistill export`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free one)")
    p.add_argument("--device", default="cpu", help="torch device of the model, e.g. cuda")
    p.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), help="dtype of the transformer (default: the export's)")
    p.add_argument("--max-sessions", type=int, default=Limits.max_sessions,
                   help="sessions open at once; more get 503")
    p.add_argument("--idle-timeout", type=float, default=Limits.idle_timeout,
                   help="seconds without requests, messages or chunks before a session is removed")
    p.add_argument("--max-prompt-chars", type=int, default=Limits.max_prompt_chars,
                   help="longest prompt or caption, in characters")
    p.add_argument("--max-shots", type=int, default=Limits.max_shots,
                   help="shots per session (their frames are kept for the mp4)")
    _add_compile(p)
    p.set_defaults(handler="launch.serve:serve")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="generate evaluation videos with an export (or a run's student) and score them")
    p.add_argument("source", metavar="EXPORT_OR_RUN", help="export folder, or run folder (its export/ or newest student)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. eval.features.kind=dino")
    p.add_argument("--prompts", metavar="FILE", help="JSONL of {global_caption, shots: [{caption}], facts?} "
                   "(default: the run's prepared records)")
    p.add_argument("--videos", type=int, help="evaluate the first N prompts (default: eval.videos; 0: all)")
    p.add_argument("--out", help="output folder (default: <run>/eval, or <export>-eval)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.add_argument("--seed", type=int, help="seed of the generation noise (default: run.seed)")
    p.set_defaults(handler="launch.evaluate:evaluate")


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="markdown table of several runs' evaluation metrics and final losses")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders; their names carry the ablation axes "
                   "(see distill/eval/compare.py)")
    p.add_argument("--out", metavar="FILE.md", help="also write the table to this file")
    p.set_defaults(handler="launch.evaluate:compare")


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="memory per GPU of every stage of a recipe, before queueing (estimates)")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    p.add_argument("--gpus", type=int, required=True, help="GPUs (ranks) of the job")
    p.add_argument("--gpu-memory", default="80GiB", help="memory of one GPU, e.g. 80GiB, 141GB (default 80GiB)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (CPU offload is per node)")
    p.set_defaults(handler="launch.plan:plan")


def _add_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="start from released checkpoints: convert them into our folders")
    kinds = p.add_subparsers(dest="import_command", required=True, metavar="RELEASE")
    s = kinds.add_parser("shotstream", help="the official ShotStream teacher (and causal student) .pt files")
    s.add_argument("--teacher", required=True, metavar="FILE", help="bidirectional_teacher.pt")
    s.add_argument("--student", metavar="FILE", help="ode_init.pt (or another causal student of the release)")
    s.add_argument("--wan", required=True, metavar="WAN_ROOT", help="the Wan2.1-T2V-1.3B diffusers root")
    s.add_argument("--out", required=True, metavar="DIR", help="folder for teacher/, student/ and recipe.yaml")
    s.set_defaults(handler="launch.importer:shotstream")


SUBCOMMANDS = [_add_run, _add_launch, _add_slurm, _add_plan, _add_config, _add_data, _add_export, _add_generate,
               _add_serve, _add_eval, _add_compare, _add_import]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shotdistill",
        description="Distill a bidirectional video diffusion teacher into a causal streaming "
                    "multi-shot student (ShotStream).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def one_line(e: BaseException) -> str:
    """The first line of an error; unexpected exception types keep their name for context."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, (ValueError, OSError, RuntimeError)) and text:
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may also follow the options (`launch R --nproc 2 train.steps=5`).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    from distill.logging import quiet_console
    quiet_console(int(os.environ.get("RANK", "0")))     # before any handler imports torch or DeepSpeed
    try:
        code = _handler(args.handler)(args)
    except KeyboardInterrupt:
        print(f"shotdistill: {rank_tag()}interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place that turns failures into one line
        if os.environ.get("SHOTDISTILL_DEBUG"):
            raise
        print(f"shotdistill: error: {rank_tag()}{one_line(e)}", file=sys.stderr)
        return 1
    return int(code or 0)


def rank_tag() -> str:
    """'[rank R] ' in one of several processes torchrun started (WORLD_SIZE > 1), '' otherwise: a job log
    tells the ranks' final lines apart, and `shotdistill launch` reads the failing rank's from it."""
    return f"[rank {os.environ.get('RANK', '0')}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


if __name__ == "__main__":
    sys.exit(main())
