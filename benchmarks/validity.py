"""ShotStream's ablations on the tiny world, over seeds, beside the paper's numbers.

Do the paper's ablations hold here? Its Table 4 (shot-boundary indicator, distillation stages) and
Table 3 (context sampling), trained and evaluated over several seeds in the `memory` caption mode,
mean ± spread per metric beside the paper's numbers.

Rows (`--rows`; the paper's row names in brackets):
- Table 4, dual-cache distinction: indicator-none [w/o Indicator], indicator-learnable [Learnable
  Emb.], phase-offset [RoPE Offset (Ours)] = the default pipeline (teacher.positions shot_rope,
  student.indicator auto);
- Table 4, distillation: stage1-only [Stage 1 Only] = the default run's dmd-intra stage as its eval
  scores it (eval.stages), no training of its own; stage2-only [Stage 2 Only] = dmd-inter trained
  from causal-init (recipes/tiny/ablations/stage2-only.yaml); both [Two Stage (Ours)] = the default
  run's dmd-inter;
- Table 3, context sampling: context-first [First Only], context-first-last [First & Last],
  dynamic [Dynamic (Ours)] = the default run.
- Memory options of other papers (issue 19; opt-in: `--rows context-noise negative-context references
  context-retrieval context-pack dpo local-compression dynamic`, each against dynamic, the default run; no paper numbers
  beside them): context-noise [FilmWeaver asymmetric noise], negative-context [FilmWeaver negative
  sampling], references [FilmWeaver multi-concept injection, trained for], context-retrieval [FilmWeaver
  shot memory retrieval, oracle similarity] and context-pack [STAGE multi-shot memory pack] retrain
  their pipelines;
  dpo [STAGE preference alignment] starts from hard links of the default run's prepare/ and teacher/,
  aligns the teacher (recipes/tiny/dpo.yaml) and distils from it; local-compression [FilmWeaver
  compressed local memory] starts from the default run's prepare/ and teacher/ and retrains the
  student stages with the previous chunk pooled 2x2 in the local cache.

Runs: per seed s, run folders `<out-root>/seed-<s>/<run>` (so `shotdistill compare` lines up one
seed's runs). Each is `shotdistill run <recipe> run.name=<run> run.out=... run.seed=<s> <overrides>`
(a subprocess of the CLI) and then the eval recipe on held-out stories. Rows that differ only after
a stage share it: stage1-only and both read the default run, and the stage2-only run starts as hard
links of the default run's finished prepare/, teacher/, ode-pairs/ and causal-init/ folders (no
copy, no retraining). The runner reuses them because a finished stage is reused when its fingerprint
(distill/keys.py: the keys it reads, less NEUTRAL ones, which include run.name and run.out) matches
the planned one; the stage2-only recipe plans those four stages from the same recipe files with the
same overrides and seed, so they match, and any difference still stops the run. Rows that change
the teacher (indicator, context) train their own pipelines.

Seeds: `run.seed` seeds model init, data order, ODE and rollout noise and the eval's generation
noise; the world (`data.synth.seed`) and the tiny text encoder's weights stay fixed, so every row
and seed trains on the same videos and is scored on the same stories: the spread is the training's.

Caption mode: `data.synth.captions=memory` (only a video's first caption names its colours and
background; later shots must recall them from the history), unless an override says otherwise. The
eval prompts are held-out stories of the same world at another world seed (`shotdistill data
stories`), written to `<out-root>/stories.jsonl` and passed as `eval.prompts`.

Resumable: a rerun launches the same commands; the runner skips finished stages and resumes
unfinished ones; `--aggregate-only` launches nothing. Aggregation reads each run's
`eval/metrics.json`. Each job's wall time (this invocation) and its stages' own compute time (the
`wall_s` of their DONE records, which survives reruns; shared stages counted once, in the run that
trained them) go to `<out-root>/timings.json`.

Run: `python benchmarks/validity.py [--seeds 0 1 2] [--rows ...] [--out-root runs/validity]
[--results benchmarks/RESULTS.md] [--stories 4] [--smoke] [--aggregate-only] [key=value ...]`; the overrides
apply to every run (eval.* ones to the eval runs only). Writes the "## Ablation validity" section of
the results file, or, for a table with opt-in rows, the "## Memory options against dynamic" section. `--smoke` shrinks every stage, one seed, into runs/validity-smoke: a plumbing
check whose table goes to stdout and `<out-root>/SMOKE.md` only, never to the results file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the shotdistill packages, run as a script from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling benchmark modules
import results  # noqa: E402
from distill import layout  # noqa: E402

SECTION = "## Ablation validity (tiny world, memory captions)"
# the opt-in rows (memory options of other papers) tabulate into their own section, so that running
# them never replaces the paper's tables
OPTIONS_SECTION = "## Memory options against dynamic (tiny world, memory captions)"
SMOKE_SECTION = "## SMOKE RUN: ablation validity plumbing check (not results)"
SMOKE_MARKER = "SMOKE"  # in an out-root the smoke wrote: real results never read from it
EVAL_RECIPE = "recipes/tiny/eval.yaml"
METRICS = ("colour_consistency", "identity_match", "inter_identity", "motion_adherence", "cut_accuracy", "fps")
BASE = ("data.synth.captions=memory", "logging.progress=false")  # before the smoke's and the user's
RESERVED = ("run.name", "run.out", "run.seed")  # set per run by this script
STORIES_SEED = 1000  # a world seed the tiny recipes never train on (they use data.synth.seed 0)
STORY_SHOTS = 5  # recipes/tiny/eval.yaml: 5-shot stories
STORIES = 4  # recipes/tiny/eval.yaml: eval.videos (more: less eval noise, at little cost next to training)
# every stage short, the world small (the tests' tiny world): only the plumbing is checked
SMOKE = ("data.synth.videos=4", "data.synth.max_frames=8", "data.height=32", "data.width=32",
         "data.shot_frames=6", "model.layers=1", "train.steps=2", "train.micro_batch=1", "teacher.eval_samples=0",
         "ode.pairs=4", "ode.pairs_per_shard=2", "ode.steps=2", "causal_init.eval_pairs=0", "dmd.eval_videos=0",
         "dmd.sample_every=0", "sampler.steps=2", "logging.tensorboard=false")
SMOKE_STORIES, SMOKE_STORY_SHOTS = 1, 3


@dataclass(frozen=True)
class RunSpec:
    """One training run per seed: its recipe and what it shares with another run of the seed."""

    recipe: str
    source: str | None = None          # the run whose finished stage folders it starts from
    shares: tuple[str, ...] = ()       # those stage folders, hard-linked
    eval_overrides: tuple[str, ...] = ()


SHARED_UPSTREAM = ("prepare", "teacher", "ode-pairs", "causal-init")
RUNS = {
    "default": RunSpec("recipes/tiny/dmd-inter.yaml"),
    "indicator-none": RunSpec("recipes/tiny/ablations/indicator-none.yaml"),
    "indicator-learnable": RunSpec("recipes/tiny/ablations/indicator-learnable.yaml"),
    # its upstream stages are the default run's own; eval.stages=[]: the final student (its
    # dmd-inter) is the row, and the shared stages are already scored in the default run
    "stage2-only": RunSpec("recipes/tiny/ablations/stage2-only.yaml", "default", SHARED_UPSTREAM,
                           ("eval.stages=[]",)),
    "context-first": RunSpec("recipes/tiny/ablations/context-first.yaml"),
    "context-first-last": RunSpec("recipes/tiny/ablations/context-first-last.yaml"),
    "context-noise": RunSpec("recipes/tiny/ablations/context-noise.yaml"),
    "negative-context": RunSpec("recipes/tiny/ablations/negative-context.yaml"),
    "references": RunSpec("recipes/tiny/ablations/references.yaml"),
    "context-retrieval": RunSpec("recipes/tiny/ablations/context-retrieval.yaml"),
    "context-pack": RunSpec("recipes/tiny/ablations/context-pack.yaml"),
    # the default teacher, aligned: its prepare and teacher are the default run's own
    "dpo": RunSpec("recipes/tiny/ablations/dpo.yaml", "default", ("prepare", "teacher")),
    # the default teacher; the student stages (ODE pairs included: they read student.*) retrained
    "local-compression": RunSpec("recipes/tiny/ablations/local-compression.yaml", "default", ("prepare", "teacher")),
}


@dataclass(frozen=True)
class Row:
    """A table row: the run (and, for a stage of it, the eval stage) whose metrics it shows."""

    key: str
    table: str
    paper: str                         # the paper's row name (a key of PAPER)
    run: str
    stage: str = ""                    # "": the run's final student; else `<stage>/<metric>` of its eval
    default: bool = True               # among the rows run when --rows is not given


ROWS = (
    Row("indicator-none", "Table 4", "w/o Indicator", "indicator-none"),
    Row("indicator-learnable", "Table 4", "Learnable Emb.", "indicator-learnable"),
    Row("phase-offset", "Table 4", "RoPE Offset (Ours)", "default"),
    Row("stage1-only", "Table 4", "Stage 1 Only", "default", "dmd-intra"),
    Row("stage2-only", "Table 4", "Stage 2 Only", "stage2-only"),
    Row("both", "Table 4", "Two Stage (Ours)", "default"),
    Row("context-first", "Table 3", "First Only", "context-first"),
    Row("context-first-last", "Table 3", "First & Last", "context-first-last"),
    Row("dynamic", "Table 3", "Dynamic (Ours)", "default"),
    Row("context-noise", "FilmWeaver", "Asymmetric Noise", "context-noise", default=False),
    Row("negative-context", "FilmWeaver", "Negative Sampling", "negative-context", default=False),
    Row("references", "FilmWeaver", "Multi-Concept Injection", "references", default=False),
    Row("context-retrieval", "FilmWeaver", "Shot Memory Retrieval", "context-retrieval", default=False),
    Row("context-pack", "STAGE", "Multi-shot Memory Pack", "context-pack", default=False),
    Row("dpo", "STAGE", "Preference Alignment", "dpo", default=False),
    Row("local-compression", "FilmWeaver", "Compressed Local Memory", "local-compression", default=False),
)

# ShotStream (../shared/papers/shotstream.md), Table 4 "Ablation Study on the Causal Student Model
# Design and Training Strategy" and Table 3 "... Bidirectional Next-Shot Teacher Model Design",
# copied as printed; columns in the paper's order.
PAPER_COLUMNS = ("intra Sub.", "intra Bg.", "inter Semantic", "inter Sub.", "inter Bg.", "Trans. Control",
                 "Text Align.", "Aesthetic", "Dynamic Deg.")
OURS = (0.825, 0.819, 0.762, 0.654, 0.645, 0.978, 0.234, 0.571, 63.06)  # every "(Ours)" row of both tables
PAPER = {
    "w/o Indicator": (0.813, 0.816, 0.728, 0.507, 0.465, 0.967, 0.203, 0.549, 63.09),
    "Learnable Emb.": (0.811, 0.809, 0.737, 0.518, 0.588, 0.972, 0.204, 0.523, 61.19),
    "RoPE Offset (Ours)": OURS,
    "Stage 1 Only": (0.803, 0.809, 0.758, 0.604, 0.622, 0.976, 0.224, 0.568, 59.66),
    "Stage 2 Only": (0.819, 0.814, 0.704, 0.583, 0.547, 0.975, 0.218, 0.467, 52.86),
    "Two Stage (Ours)": OURS,
    "First Only": (0.789, 0.793, 0.671, 0.618, 0.612, 0.956, 0.212, 0.502, 61.55),
    "First & Last": (0.809, 0.827, 0.709, 0.629, 0.638, 0.969, 0.223, 0.528, 62.08),
    "Dynamic (Ours)": OURS,
}
# our metric -> the paper column printed beside it (the nearest in meaning, not the same measurement)
BESIDE = {"inter_identity": "inter Sub.", "cut_accuracy": "Trans. Control"}


@dataclass(frozen=True)
class Job:
    """One run of one seed: where it goes and the commands that make it."""

    seed: int
    run: str
    out: Path                          # run.out: <out-root>/seed-<s>
    train: tuple[str, ...]             # `shotdistill` arguments
    eval: tuple[str, ...]
    source: Path | None = None         # the run folder it shares stages with
    shares: tuple[str, ...] = ()

    @property
    def folder(self) -> Path:
        return layout.run_dir(self.out, self.run)


# --------------------------------------------------------------------------- the plan


def override_key(item: str) -> str:
    return item.split("=", 1)[0].strip()


def reads_eval(item: str) -> bool:
    """Whether the eval stage reads the override's key (distill/keys.py ownership): it goes to the
    eval runs, whose tree refuses any key it does not read."""
    from distill import keys
    from distill.stages import resolve

    key = override_key(item)
    return any(key == p or key.startswith(p + ".") for p in keys.stage_reads(resolve("eval")))


def for_training(overrides: list[str]) -> list[str]:
    """Every override but the eval section's (no training stage reads it)."""
    return [o for o in overrides if not override_key(o).startswith("eval.")]


def runs_for(rows: list[str]) -> list[str]:
    """The runs the rows read, each after the run it shares stages with, in RUNS order."""
    wanted = {r.run for r in ROWS if r.key in rows}
    wanted |= {RUNS[name].source for name in wanted if RUNS[name].source}
    return [name for name in RUNS if name in wanted]


def plan_jobs(rows: list[str], seeds: list[int], out_root: Path, overrides: list[str],
              stories: Path, count: int) -> list[Job]:
    """Every run of every seed, seed by seed (a finished seed is usable while the next one trains)."""
    jobs = []
    for seed in seeds:
        out = out_root / f"seed-{seed}"
        for name in runs_for(rows):
            spec = RUNS[name]
            ident = (f"run.name={name}", f"run.out={out}", f"run.seed={seed}")
            train = ("run", str(REPO / spec.recipe), *ident, *for_training(overrides))
            evals = ("run", str(REPO / EVAL_RECIPE), *ident, f"eval.prompts={stories}", f"eval.videos={count}",
                     *spec.eval_overrides, *[o for o in overrides if reads_eval(o)])
            source = layout.run_dir(out, spec.source) if spec.source else None
            jobs.append(Job(seed, name, out, train, evals, source, spec.shares))
    return jobs


def stories_command(out: Path, seed: int, count: int, shots: int, overrides: list[str]) -> tuple[str, ...]:
    """`shotdistill data stories` with the runs' world overrides (it reads the data.synth keys)."""
    return ("data", "stories", "--out", str(out), "--seed", str(seed), "--count", str(count),
            "--shots", str(shots), *for_training(overrides))


def world_seed(overrides: list[str]) -> int:
    """The training world's data.synth.seed under these overrides (the stories must use another)."""
    from distill.config import load_recipe

    return int(load_recipe(REPO / "recipes/tiny/prepare.yaml", for_training(overrides)).data.synth.seed)


# --------------------------------------------------------------------------- sharing


def link_stages(source: Path, target: Path, stages: tuple[str, ...]) -> list[str]:
    """Hard-link each finished stage folder of run `source` into run folder `target` (`cp -al`), so
    the runner finds it finished there; return the folders linked now. A folder already in `target`
    with a DONE marker is left alone (a rerun); one without (half-made by someone else) is an error.
    Safe to share: a finished stage is never written again, and every write in this code base
    renames a new file into place (teacher/files.py) instead of writing into a linked one."""
    linked = []
    for stage in stages:
        src, dst = source / stage, target / stage
        if layout.done_record(src) is None:
            raise RuntimeError(f"{src} has not finished: {target.name} cannot share it")
        if dst.exists():
            if layout.done_record(dst) is None:
                raise RuntimeError(f"{dst} exists without {layout.DONE}: remove it to share {src}")
            continue
        partial = dst.with_name(f".{stage}.linking")  # renamed into place whole: never half-linked
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(src, partial, copy_function=os.link)
        partial.rename(dst)
        linked.append(stage)
    return linked


# --------------------------------------------------------------------------- running


def shotdistill(args: tuple[str, ...], log: Path) -> tuple[int, float]:
    """Run the CLI (`python -m launch.cli`, the `shotdistill` entry point) in this working directory
    (relative run.out and eval.prompts mean what they mean to the user), appending its output to
    `log`; (exit code, seconds)."""
    t0 = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"\n$ shotdistill {' '.join(args)}\n")
        out.flush()
        code = subprocess.run([sys.executable, "-m", "launch.cli", *args], stdout=out,
                              stderr=subprocess.STDOUT).returncode
    return code, time.perf_counter() - t0


def own_stage_seconds(job: Job) -> float:
    """Compute time of the stages this run made itself (DONE wall_s), shared ones left out."""
    folder = job.folder
    stages = [d for d in folder.iterdir() if d.is_dir() and d.name not in job.shares] if folder.is_dir() else []
    return sum((layout.done_record(d) or {}).get("wall_s", 0.0) for d in stages)


def run_job(job: Job, failed: set[tuple[int, str]]) -> dict:
    """Share, train, evaluate; the job's timing record (status ok | failed: ... | skipped: ...)."""
    if job.source is not None and (job.seed, job.source.name) in failed:
        return {"status": f"skipped: {job.source.name} failed"}
    job.out.mkdir(parents=True, exist_ok=True)
    log = job.out / f"{job.run}.log"
    try:
        record = {"linked": link_stages(job.source, job.folder, job.shares) if job.source else []}
    except RuntimeError as e:
        return {"status": f"failed: {e}"}
    for part in ("train", "eval"):
        code, seconds = shotdistill(getattr(job, part), log)
        record[f"{part}_s"] = round(seconds, 1)
        if code != 0:
            record["status"] = f"failed: {part} exited {code} (see {log})"
            break
    record.setdefault("status", "ok")
    record["stages_s"] = round(own_stage_seconds(job), 1)
    return record


def run_all(jobs: list[Job], timings: Path) -> dict[str, dict]:
    """Every job in order, each reported and recorded in `timings` as it ends."""
    done = json.loads(timings.read_text()) if timings.is_file() else {}
    failed: set[tuple[int, str]] = set()
    for job in jobs:
        record = run_job(job, failed)
        if record["status"] != "ok":
            failed.add((job.seed, job.run))
        done[f"seed-{job.seed}/{job.run}"] = record
        timings.write_text(json.dumps(done, indent=2) + "\n")
        print(f"seed {job.seed} {job.run:<20} {record['status']:<8} train {record.get('train_s', 0):7.1f} s  "
              f"eval {record.get('eval_s', 0):6.1f} s  own stages {record.get('stages_s', 0):7.1f} s", flush=True)
    return done


# --------------------------------------------------------------------------- aggregation


def run_metrics(folder: Path) -> dict[str, float] | None:
    """The run's eval/metrics.json (None when it has none), read as `shotdistill compare` reads it."""
    from distill.eval.compare import run_summary

    return run_summary(folder)["eval"] if folder.is_dir() else None


def row_values(row: Row, out_root: Path, seeds: list[int]) -> dict[str, list[float]]:
    """Per metric, the row's value in every seed whose run has it."""
    prefix = f"{row.stage}/" if row.stage else ""
    values: dict[str, list[float]] = {m: [] for m in METRICS}
    for seed in seeds:
        metrics = run_metrics(layout.run_dir(out_root / f"seed-{seed}", row.run)) or {}
        for m in METRICS:
            if prefix + m in metrics:
                values[m].append(float(metrics[prefix + m]))
    return values


def spread(values: list[float], digits: int) -> str:
    """mean ± sample standard deviation (n - 1); the mean alone for one value; "–" for none."""
    if not values:
        return "–"
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f}" + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")


def results_table(rows: list[str], out_root: Path, seeds: list[int]) -> str:
    """Markdown: one line per row, our metrics (mean ± std over seeds) with the paper's nearest
    column beside inter_identity and cut_accuracy."""
    head = ["table", "row (paper)", "run", "seeds"]
    for m in METRICS:
        head += [m] + ([f"paper {BESIDE[m]}"] if m in BESIDE else [])
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for row in (r for r in ROWS if r.key in rows):
        values = row_values(row, out_root, seeds)
        cells = [row.table, f"{row.key} ({row.paper})", row.run + (f" {row.stage}" if row.stage else ""),
                 str(max(len(v) for v in values.values()))]
        for m in METRICS:
            cells.append(spread(values[m], 1 if m == "fps" else 3))
            if m in BESIDE:
                cells.append(f"{PAPER[row.paper][PAPER_COLUMNS.index(BESIDE[m])]:g}" if row.paper in PAPER else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paper_table(rows: list[str]) -> str:
    """The paper's rows for the chosen rows, every column, as printed in shotstream.md."""
    lines = ["| table | paper row | " + " | ".join(PAPER_COLUMNS) + " |", "|---" * (len(PAPER_COLUMNS) + 2) + "|"]
    for row in (r for r in ROWS if r.key in rows and r.paper in PAPER):
        lines.append(f"| {row.table} | {row.paper} | " + " | ".join(f"{v:g}" for v in PAPER[row.paper]) + " |")
    return "\n".join(lines) + "\n"


def timing_lines(timings: dict[str, dict], runs: list[str]) -> list[str]:
    """Per run of `runs`, its stages' own compute time over the seeds (what a fresh run costs), and the total."""
    per_run: dict[str, list[float]] = {}
    for name, record in timings.items():
        if name.split("/", 1)[1] in runs:
            per_run.setdefault(name.split("/", 1)[1], []).append(record.get("stages_s", 0.0))
    total = sum(sum(v) for v in per_run.values())
    parts = [f"{run} {statistics.fmean(v):.0f} s" for run, v in per_run.items()]
    return [f"Compute time of the runs' own stages (DONE `wall_s`; mean per seed): {'; '.join(parts)}; "
            f"total {total:.0f} s ({total / 3600:.2f} h)."]


def section(title: str, meta: dict, rows: list[str], out_root: Path, seeds: list[int], timings: dict) -> str:
    lines = [title, "",
             f"`{meta['command']}` ({meta['date']}; seeds {' '.join(map(str, seeds))}; overrides on every run: "
             f"`{' '.join(meta['overrides'])}`; eval: {meta['stories']} held-out {meta['shots']}-shot stories of world "
             f"seed {meta['stories_seed']}, `{meta['stories_file']}`). Run folders: `{out_root}/seed-<s>/<run>`.",
             "",
             "Each cell: mean ± sample standard deviation (n - 1) over the seeds whose run finished (column "
             "`seeds`); `run.seed` varies, the world and the stories do not. stage1-only is the default run's "
             "dmd-intra stage as its eval scores it; stage2-only starts from hard links of the default run's "
             "prepare, teacher, ode-pairs and causal-init. fps is measured on a shared CPU (noisy). The paper "
             "columns are ShotStream's (../shared/papers/shotstream.md, Tables 3 and 4): learned-feature scores "
             "on real video (DINOv2 subject consistency, TransNet V2 shot cut accuracy), beside our nearest "
             "palette-based metrics; compare the direction of a difference between rows, not values.",
             "", results_table(rows, out_root, seeds), "The paper's rows, every column:", "", paper_table(rows)]
    return "\n".join(lines + timing_lines(timings, runs_for(rows))) + "\n"


def section_title(rows: list[str], smoke: bool) -> str:
    """The results section a table of `rows` goes to: the paper's tables, or the memory options'."""
    if smoke:
        return SMOKE_SECTION
    return SECTION if all(r.default for r in ROWS if r.key in rows) else OPTIONS_SECTION


# --------------------------------------------------------------------------- the command


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", help="run.seed values (default 0 1 2; smoke: 0)")
    parser.add_argument("--rows", nargs="+", choices=[r.key for r in ROWS], default=[r.key for r in ROWS if r.default],
                        help="rows to run and tabulate (default: ShotStream's Tables 3 and 4)")
    parser.add_argument("--out-root", type=Path, help="parent of the seed folders (default runs/validity; "
                        "smoke: runs/validity-smoke)")
    parser.add_argument("--results", type=Path, help=f"results file (default {results.RESULTS.relative_to(REPO)}; "
                        "not with --smoke, whose table is never a result)")
    parser.add_argument("--stories", type=int, default=STORIES, help="held-out stories scored per run (eval.videos)")
    parser.add_argument("--stories-seed", type=int, default=STORIES_SEED, help="world seed of the eval stories")
    parser.add_argument("--smoke", action="store_true", help="tiny everything, one seed: the plumbing only")
    parser.add_argument("--aggregate-only", action="store_true", help="launch nothing; tabulate what exists")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every run")
    args = parser.parse_args(argv)
    args.seeds = args.seeds or ([0] if args.smoke else [0, 1, 2])
    args.out_root = args.out_root or Path("runs/validity-smoke" if args.smoke else "runs/validity")
    if args.smoke and args.results:
        parser.error("--smoke writes no results file: its table goes to stdout and <out-root>/SMOKE.md")
    args.results = args.results or results.RESULTS
    bad = [o for o in args.overrides if "=" not in o or override_key(o) in RESERVED]
    if bad:
        parser.error(f"overrides must be key=value and not set {', '.join(RESERVED)} (set per run): {bad}")
    return args


def check_out_root(out_root: Path, smoke: bool) -> None:
    """A smoke out-root holds only smoke runs, a real one only real runs: they never mix in a table."""
    marked = (out_root / SMOKE_MARKER).is_file()
    if marked != smoke and out_root.is_dir() and any(out_root.iterdir()):
        raise SystemExit(f"{out_root} holds {'smoke' if marked else 'real'} runs; choose another --out-root")
    out_root.mkdir(parents=True, exist_ok=True)
    if smoke:
        (out_root / SMOKE_MARKER).write_text("runs of `benchmarks/validity.py --smoke`: not results\n")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    t0 = time.perf_counter()
    check_out_root(args.out_root, args.smoke)
    overrides = list(BASE) + (list(SMOKE) if args.smoke else []) + list(args.overrides)
    count, shots = (SMOKE_STORIES, SMOKE_STORY_SHOTS) if args.smoke else (args.stories, STORY_SHOTS)
    stories = args.out_root / "stories.jsonl"
    timings_file = args.out_root / "timings.json"
    ok = True
    if not args.aggregate_only:
        if world_seed(overrides) == args.stories_seed:
            raise SystemExit(f"--stories-seed {args.stories_seed} is the training world's data.synth.seed")
        code, _ = shotdistill(stories_command(stories, args.stories_seed, count, shots, overrides),
                              args.out_root / "stories.log")
        if code != 0:
            raise SystemExit(f"writing the stories failed: see {args.out_root / 'stories.log'}")
        jobs = plan_jobs(args.rows, args.seeds, args.out_root, overrides, stories, count)
        ok = all(r["status"] == "ok" for r in run_all(jobs, timings_file).values())
    meta = {"command": "python benchmarks/validity.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": datetime.date.today().isoformat(), "overrides": overrides, "stories": count, "shots": shots,
            "stories_seed": args.stories_seed, "stories_file": stories}
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    text = section(section_title(args.rows, args.smoke), meta, args.rows, args.out_root, args.seeds, timings)
    print(text)
    if args.smoke:
        (args.out_root / "SMOKE.md").write_text(text)
    else:
        results.write_section(text, args.results)
    print(f"wall time of this invocation: {time.perf_counter() - t0:.0f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
