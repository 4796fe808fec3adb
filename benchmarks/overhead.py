"""The framework's overhead, measured on the CPU: our trainer against a bare PyTorch loop, side by side.

One run times, in alternating rounds on the tiny recipes' models (benchmarks/steps.py):
- a teacher step and an intra-shot DMD step (generator every 5th step, critic every step) of our
  trainer (DeepSpeed engines, TensorBoard logging, the stop-signal collective, checkpoint
  bookkeeping; the final checkpoint write timed apart) against a bare loop over the same modules,
  the same step function and the same batches held in memory, with torch.optim.AdamW;
- the data path: the trainer reading real prepared shards (the tiny synthetic world, prepared first)
  against the trainer over those very batches held in memory;
- the student against the teacher per shot (benchmarks/streaming.py's `shot_times`).

Goals (issue 17): teacher <= 1.10x and DMD <= 1.15x the bare loop; shards within 5% of memory;
student >= 25x faster than the teacher per shot. Each figure is a ratio of two timings of one run;
per variant the round with the lowest mean is kept (the least disturbed on a shared machine), and
the ratio of the per-round medians is printed beside it.

Run: `python benchmarks/overhead.py [--steps 15] [--rounds 3] [--threads 1] [--write]`; `--write`
replaces the "## Framework overhead (CPU)" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling benchmark modules
import results  # noqa: E402
import steps  # noqa: E402

SECTION = "## Framework overhead (CPU)"
GOALS = {"teacher": 1.10, "dmd-intra": 1.15, "data": 1.05, "speedup": 25.0}


def load() -> tuple[float, float, float]:
    return os.getloadavg()


def prepare(run_out: Path) -> None:
    """The tiny synthetic world prepared into <run_out>/bench/prepare (what shot_stream reads)."""
    from distill.runner import run_recipe

    run_recipe(steps.TINY / "prepare.yaml", [f"run.out={run_out}", "run.name=bench", "logging.progress=false"])


def measure_stage(kind: str, run_out: Path, env, count: int, rounds: int, window: tuple[int, int]) -> dict:
    """Per round: trainer over batches in memory, bare loop over the same batches, trainer over shards."""
    from distill.data.components import shot_stream

    overrides = [f"train.steps={count}", f"train.checkpoint_every={count}"]
    build = steps.teacher_harness if kind == "teacher" else steps.dmd_harness
    cfg = steps.recipe(kind, run_out, overrides)
    batches = steps.collect(shot_stream(cfg, env.rank, env.world_size), count)
    variants = {
        "trainer": lambda: steps.run_trainer(build(cfg, env, steps.InMemory(batches)), cfg, env),
        "bare": lambda: steps.run_bare(build(cfg, env, steps.InMemory(batches)), cfg, env, count),
        "trainer_shards": lambda: steps.run_trainer(build(cfg, env, shot_stream(cfg, env.rank, env.world_size)),
                                                    cfg, env),
    }
    means: dict[str, list[float]] = {name: [] for name in variants}
    extra: dict[str, list[float]] = {"setup_s": [], "save_s": []}
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            timing = variants[name]()
            means[name].append(timing.mean(*window))
            if name == "trainer":
                extra["setup_s"].append(timing.setup_s)
                extra["save_s"].append(timing.save_s)
    best = {name: min(v) for name, v in means.items()}
    median = {name: statistics.median(v) for name, v in means.items()}
    return {"step_s_min": best, "step_s_median": median, "rounds": means,
            "overhead": best["trainer"] / best["bare"], "overhead_median": median["trainer"] / median["bare"],
            "data": best["trainer_shards"] / best["trainer"],
            "data_median": median["trainer_shards"] / median["trainer"],
            "setup_s": min(extra["setup_s"]), "final_save_s": min(extra["save_s"]),
            "window": list(window), "steps": count}


def measure_speedup(repeats: int) -> dict:
    """Student vs teacher per shot, with benchmarks/streaming.py's own functions and defaults."""
    import streaming

    gen, teacher, cfg = streaming.build(streaming.ROOT / "recipes/tiny/teacher.yaml",
                                        streaming.ROOT / "recipes/tiny/causal-init.yaml", [])
    student_s, teacher_s = streaming.shot_times(gen, teacher, cfg, 50, 5.0, repeats)
    return {"student_s": student_s, "teacher_s": teacher_s, "speedup": teacher_s / student_s, "repeats": repeats}


def format_section(data: dict) -> str:
    m = data["meta"]
    t, d, s = data.get("teacher"), data.get("dmd-intra"), data.get("speedup")
    lines = [SECTION, "", f"`{m['command']}` ({m['date']}, {m['threads']} torch thread(s); load average "
             f"{m['load_before'][0]:.2f} before, {m['load_after'][0]:.2f} after, on the shared 2-core machine).",
             "Ratios of two timings of one run; per variant the round with the lowest mean step time "
             f"({m['rounds']} rounds, alternating order), the ratio of per-round medians in brackets.", "",
             "| what | ours | reference | ratio (medians) | goal | met |", "|---|---|---|---|---|---|"]

    def row(what, ours, ref, ratio, med, goal, higher=False):
        met = ratio >= goal if higher else ratio <= goal
        lines.append(f"| {what} | {ours} | {ref} | {ratio:.3f} ({med:.3f}) | {'>=' if higher else '<='} {goal} | "
                     f"{'yes' if met else '**no**'} |")
    for kind, r in (("teacher", t), ("dmd-intra", d)):
        if r is None:
            continue
        label = "teacher step" if kind == "teacher" else "DMD step (mean over whole 1:5 periods)"
        ms = {k: v * 1e3 for k, v in r["step_s_min"].items()}
        row(f"{label}: trainer / bare loop", f"{ms['trainer']:.1f} ms", f"{ms['bare']:.1f} ms", r["overhead"],
            r["overhead_median"], GOALS[kind])
        row(f"{label}: real shards / in memory", f"{ms['trainer_shards']:.1f} ms", f"{ms['trainer']:.1f} ms",
            r["data"], r["data_median"], GOALS["data"])
    if s:
        lines.append(f"| student vs teacher per shot (tiny, 64 tok/frame) | {s['student_s']:.3f} s | "
                     f"{s['teacher_s']:.2f} s | {s['speedup']:.1f}x | >= {GOALS['speedup']}x | "
                     f"{'yes' if s['speedup'] >= GOALS['speedup'] else '**no**'} |")
    lines.append("")
    for kind, r in (("teacher", t), ("dmd-intra", d)):
        if r is not None:
            lines.append(f"{kind}: {r['steps']} steps per run, mean over steps {r['window'][0]}..{r['window'][1] - 1}; "
                         f"outside the loop: engine set-up {r['setup_s']:.2f} s, final checkpoint write "
                         f"{r['final_save_s']:.2f} s; per-round means (s): "
                         + "; ".join(f"{k} " + ", ".join(f"{x:.3f}" for x in v) for k, v in r["rounds"].items()))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15, help="steps per run (DMD: a multiple of 5, plus 0)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared CPU)")
    parser.add_argument("--speedup-repeats", type=int, default=3, help="repeats of the student/teacher shot timing")
    parser.add_argument("--parts", default="teacher,dmd-intra,speedup")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--write", action="store_true", help="replace the section of benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    data = {"meta": {"command": "python benchmarks/overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                     "date": datetime.datetime.now().isoformat(timespec="minutes"), "threads": args.threads,
                     "rounds": args.rounds, "load_before": load()}}
    tmp = Path(tempfile.mkdtemp(prefix="overhead-"))
    env = steps.environment()
    if {"teacher", "dmd-intra"} & set(parts):
        prepare(tmp)
    first = 5 if args.steps > 10 else 1
    if "teacher" in parts:
        data["teacher"] = measure_stage("teacher", tmp, env, args.steps, args.rounds, (2, args.steps))
    if "dmd-intra" in parts:
        periods = max((args.steps - first) // 5, 1) * 5
        data["dmd-intra"] = measure_stage("dmd-intra", tmp, env, args.steps, args.rounds, (first, first + periods))
    if "speedup" in parts:
        data["speedup"] = measure_speedup(args.speedup_repeats)
    data["meta"]["load_after"] = load()
    text = format_section(data)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    if args.write:
        results.write_section(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
