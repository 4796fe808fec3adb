"""Handlers of `shotdistill export`, `shotdistill generate` and `shotdistill serve`.

`generate` takes the shots' prompts from `--shot` (repeatable), a `--shots` file (one per line) or,
with `--interactive`, from stdin after each shot (an empty line or end of input stops). Every prompt
given up front and the frame count are checked before the model loads or a file is written; frames
are appended to the mp4 chunk by chunk as they are generated, and the file appears only when the
video is complete. `--reference IMAGE:CAPTION` (repeatable; split at the first ':', so a caption may hold
':' but a path may not) adds a reference image to the generator's global cache (student/generator.py);
each image is read with Pillow before the model loads and resized (bilinear, aspect not kept) to the
video size, as the training crops are (distill/data/references.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Iterator


def quiet_loading() -> None:
    """No per-file progress bars from diffusers/transformers: stderr is for our one-line messages."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def export(args: argparse.Namespace) -> int:
    """Export the newest finished student of RUN_DIR (or a stage folder) into --out (its transformer in
    --dtype); with --verify, check that the export generates what that student generates."""
    from distill.export import export_run, verify_run_export
    from launch.cli import EXPORT_DTYPES
    from teacher.encoders import DTYPES

    quiet_loading()
    folder = export_run(args.source, args.out, torch_dtype=DTYPES[EXPORT_DTYPES[args.dtype]] if args.dtype else None)
    print(f"exported {folder}")
    if args.verify:
        gaps = verify_run_export(args.source, folder, device=args.device)
        print(f"verified {folder}: its 2-shot story matches the trained student's (mean |difference|: "
              + ", ".join(f"{gap:.2e} against it in {dtype}" for dtype, gap in gaps.items()) + ")")
    return 0


def read_shots_file(path: str) -> list[str]:
    """Prompts of a --shots file, one per line; a blank line in the middle is an error."""
    from teacher.files import read_text

    lines = read_text(path, "shots file").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise ValueError(f"{path}:{number}: shot prompt is empty: every shot needs a description")
    if not lines:
        raise ValueError(f"{path}: no shot prompts")
    return [line.strip() for line in lines]


def given_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts named on the command line, checked."""
    prompts = list(args.shot or []) + (read_shots_file(args.shots) if args.shots else [])
    for i, prompt in enumerate(prompts, 1):
        if not prompt.strip():
            raise ValueError(f"shot {i}: shot prompt is empty: every shot needs a description")
    if not prompts and not args.interactive:
        raise ValueError("generate: give --shot TEXT, --shots FILE or --interactive")
    return prompts


def prompts_stream(given: list[str], interactive: bool) -> Iterator[str]:
    """The given prompts, then (interactive) one line of stdin after each shot."""
    yield from given
    while interactive:
        print("next shot (empty line to finish)> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return
        yield line.strip()


def read_references(specs: list[str]) -> list[tuple[Path, str, object]]:
    """(path, caption, RGB Pillow image) of each --reference IMAGE:CAPTION, checked (one-line errors)."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for spec in specs:
        path, sep, caption = spec.partition(":")
        if not sep or not path:
            raise ValueError(f"--reference {spec!r}: expected IMAGE:CAPTION")
        try:
            with Image.open(path) as image:
                out.append((Path(path), caption.strip(), image.convert("RGB")))
        except FileNotFoundError:
            raise ValueError(f"--reference {path}: image not found") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"--reference {path}: not a readable image ({type(e).__name__})") from None
    return out


def as_references(images: list, height: int, width: int) -> list:
    """Generator references: each image resized to the video size, as uint8 [H, W, 3]."""
    import numpy as np
    import torch
    from PIL import Image

    from student.generator import Reference

    return [Reference(torch.from_numpy(np.asarray(image.resize((width, height), Image.BILINEAR)).copy()), caption)
            for _, caption, image in images]


def generate(args: argparse.Namespace) -> int:
    """Generate a multi-shot video from an export folder into --out."""
    given = given_prompts(args)
    images = read_references(args.reference or [])
    if args.frames is not None and args.frames < 1:
        raise ValueError(f"--frames must be a positive frame count, got {args.frames}")
    from student.generator import StreamingGenerator
    from student.video import Mp4Writer

    quiet_loading()
    gen = StreamingGenerator.from_export(args.export, device=args.device, global_prompt=args.global_prompt,
                                         seed=args.seed, compile=args.compile)
    if images:
        gen.reset(as_references(images, gen.video.height, gen.video.width))
    frames = gen.video.frames if args.frames is None else args.frames
    gen.chunks_for(frames)  # a bad count fails before anything is written
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with Mp4Writer(out, gen.video.fps) as writer:
        for number, prompt in enumerate(prompts_stream(given, args.interactive), 1):
            start, made = time.perf_counter(), 0
            for chunk in gen.next_shot(prompt, frames):
                writer.append(chunk)
                made += chunk.shape[0]
            print(f"shot {number}: {made} frames in {time.perf_counter() - start:.2f}s  {prompt}", file=sys.stderr)
        if writer.frames == 0:
            raise ValueError("generate: no shots were given")
    print(f"wrote {out} ({writer.frames} frames)")
    return 0


def serve(args: argparse.Namespace) -> int:
    """Load an export once and serve it (serve/app.py) until interrupted."""
    import uvicorn

    from launch.cli import EXPORT_DTYPES
    from serve.app import create_app
    from serve.limits import Limits
    from serve.sessions import load_models
    from teacher.encoders import DTYPES

    limits = Limits(args.max_sessions, args.idle_timeout, args.max_prompt_chars, args.max_shots).check()
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be 0..65535, got {args.port}")
    quiet_loading()
    models = load_models(args.export, device=args.device,
                         dtype=DTYPES[EXPORT_DTYPES[args.dtype]] if args.dtype else None, compile=args.compile)
    print(f"serving {args.export} on http://{args.host}:{args.port} (the page is at /)", file=sys.stderr)
    uvicorn.run(create_app(models, limits), host=args.host, port=args.port, log_level="info")
    return 0
