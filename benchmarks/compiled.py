"""Eager vs compiled streaming, side by side in one run: time to first frame, frames per second, per-chunk ms,
compile (warm-up) time, for each `compile` mode of StreamingGenerator (student/compiled.py).

Every mode gets its own copy of one random student (the tiny recipes' model by default, benchmarks/streaming.py
builds it; "regions" compiles modules in place), and the timed rounds alternate between the modes, so a
shared machine's load falls on all of them alike. Per mode:

- warm-up: the first two shots after the generator is built (the first compiles the chunk passes, the second
  is the first with history): seconds, and the graphs torch.compile made;
- then `--rounds` rounds of `--shots` shots from `reset()` (the first shot of a round has no history, the
  others do), timing each shot from `next_shot` to its last frames: time to first frame (text encoding,
  context pass and the first chunk), frames per second over the shot, and per-chunk ms (every chunk after a
  shot's first). Medians over the rounds, and the minimum (the least disturbed on a shared CPU).
- the largest frame difference against eager over one shared story (uint8 levels).

Run: python benchmarks/compiled.py [--modes none,regions,compile] [--threads 1] [--inductor freezing=True]
[--json out.json] ("cudagraph" joins the default modes on CUDA; --inductor sets torch._inductor.config keys).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling benchmark modules
import streaming  # noqa: E402

from student.compiled import MODES  # noqa: E402
from student.generator import StreamingGenerator  # noqa: E402

PROMPTS = streaming.PROMPTS


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model (/proc/cpuinfo, else platform) with its core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} logical CPUs)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_shot(gen: StreamingGenerator, prompt: str) -> dict:
    """One shot: seconds to each chunk's frames (on the CPU, so the device is synchronised)."""
    _sync(gen.device)
    start, arrivals, frames = time.perf_counter(), [], 0
    for chunk in gen.next_shot(prompt):
        arrivals.append(time.perf_counter() - start)
        frames += chunk.shape[0]
    return {"ttff_s": arrivals[0], "shot_s": arrivals[-1], "frames": frames,
            "chunk_ms": [1000 * (b - a) for a, b in zip(arrivals, arrivals[1:])]}


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def story(gen: StreamingGenerator, shots: int) -> list[torch.Tensor]:
    gen.reset()
    return [torch.cat(list(gen.next_shot(PROMPTS[k % len(PROMPTS)]))) for k in range(shots)]


def run(gens: dict[str, StreamingGenerator], rounds: int, shots: int) -> dict:
    """Warm-up, then the rounds, the modes alternating within each round (module doc)."""
    out = {}
    for mode, gen in gens.items():
        before = graphs()
        gen.reset()
        warm = [timed_shot(gen, PROMPTS[k]) for k in range(2)]
        out[mode] = {"warmup_s": [w["shot_s"] for w in warm], "graphs": graphs() - before, "shots": []}
    for _ in range(rounds):
        for mode, gen in gens.items():
            gen.reset()
            out[mode]["shots"] += [timed_shot(gen, PROMPTS[k % len(PROMPTS)]) for k in range(shots)]
    reference = story(gens["none"], shots) if "none" in gens else None
    for mode, gen in gens.items():
        rows = out[mode].pop("shots")
        chunk_ms = [ms for r in rows for ms in r["chunk_ms"]]
        shot_s = [r["shot_s"] for r in rows]
        frames = rows[0]["frames"]
        out[mode].update(
            frames_per_shot=frames, shots_timed=len(rows),
            ttff_ms={"median": 1000 * statistics.median(r["ttff_s"] for r in rows),
                     "min": 1000 * min(r["ttff_s"] for r in rows)},
            fps={"median": frames / statistics.median(shot_s), "max": frames / min(shot_s)},
            chunk_ms={"median": statistics.median(chunk_ms), "min": min(chunk_ms)} if chunk_ms else None,
            # first shot minus a steady one: what compiling (and capturing) costs once
            compile_s=out[mode]["warmup_s"][0] - statistics.median(shot_s))
        if reference is not None:
            mine = story(gen, shots)
            out[mode]["max_frame_diff"] = max(int((a.int() - b.int()).abs().max()) for a, b in zip(reference, mine))
    return out


def format_table(result: dict) -> str:
    lines = ["| mode | graphs | compile + first shot | time to first frame (median / min) | FPS (median / best) | "
             "per-chunk ms (median / min) | max frame diff vs eager |", "|---|---|---|---|---|---|---|"]
    for mode, r in result["modes"].items():
        chunk = "n/a" if r["chunk_ms"] is None else f"{r['chunk_ms']['median']:.1f} / {r['chunk_ms']['min']:.1f}"
        lines.append(f"| {mode} | {r['graphs']} | {r['warmup_s'][0]:.1f} s | {r['ttff_ms']['median']:.1f} / "
                     f"{r['ttff_ms']['min']:.1f} ms | {r['fps']['median']:.1f} / {r['fps']['max']:.1f} | {chunk} | "
                     f"{r.get('max_frame_diff', 'n/a')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-recipe", type=Path, default=streaming.ROOT / "recipes/tiny/teacher.yaml")
    parser.add_argument("--student-recipe", type=Path, default=streaming.ROOT / "recipes/tiny/causal-init.yaml")
    parser.add_argument("--modes", help=f"comma-separated subset of {','.join(MODES)} (default: all that run here)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shots", type=int, default=3, help="shots per round (all but the first with history)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                        help="a torch._inductor.config setting for this run, e.g. freezing=True or max_autotune=True")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of both recipes")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    modes = args.modes.split(",") if args.modes else [m for m in MODES if m != "cudagraph" or device.type == "cuda"]
    torch.set_num_threads(args.threads)
    inductor = dict(setting.split("=", 1) for setting in args.inductor)
    for key, value in inductor.items():
        import torch._inductor.config as config

        if not hasattr(config, key):
            parser.error(f"--inductor {key}: torch._inductor.config has no such setting")
        setattr(config, key, json.loads(value.lower()) if value.lower() in ("true", "false") else value)
    base, _, _ = streaming.build(args.teacher_recipe, args.student_recipe, args.overrides)
    gens = {}
    for mode in modes:
        student = copy.deepcopy(base.student).to(device)
        gens[mode] = StreamingGenerator(student, base.codec, base.text_encoder, base.video,
                                        global_prompt=base.global_prompt, seed=base.seed, compile=mode)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    command = "python benchmarks/compiled.py " + " ".join(argv or sys.argv[1:])
    result = {"device": device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "inductor": inductor, "load_before": load, "command": command,
              "rounds": args.rounds, "shots": args.shots, "modes": run(gens, args.rounds, args.shots),
              "load_after": os.getloadavg() if hasattr(os, "getloadavg") else None}
    print(json.dumps(result, indent=2))
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
