"""`shotdistill compare RUN_DIR ...`: one markdown table of the final numbers of several runs.

Runs are the columns; the rows are, in order:

- the ablation axes read from the run folder names: `variant`, a name's words (split at "-" and
  "__") after the words every compared name starts with (tiny, tiny-indicator-none -> "(base)",
  "indicator-none"); and, for names of tokens joined by "__", every `key=value` token as an axis of
  its own (`tiny__indicator=none__stages=intra` has axes indicator and stages);
- the evaluation metrics of `<run>/eval/metrics.json` (the eval stage's, or `shotdistill eval RUN`'s):
  the final student's, then, when the eval stage scored `eval.stages`, each stage's as `<stage>/<metric>`;
- the final losses of every finished stage: the `*loss*` entries of `<run>/<stage>/metrics.json`,
  as `<stage> <name>`, stages in the order they finished.

A run without an evaluation or a stage shows "–" in those rows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from distill import layout

AXIS_SEPARATOR = "__"
MISSING_CELL = "–"


def run_axes(name: str) -> dict[str, str]:
    """The `key=value` tokens of a run folder name (see module doc)."""
    pairs = [token.split("=", 1) for token in name.split(AXIS_SEPARATOR) if "=" in token]
    return {k: v for k, v in pairs if k}


def variants(names: list[str]) -> list[str]:
    """Each name without the leading words all names share, rejoined by "-" ("(base)" if nothing is left)."""
    words = [re.split(r"-|__", n) for n in names]
    shared = 0
    while all(len(w) > shared and w[shared] == words[0][shared] for w in words):
        shared += 1
    return ["-".join(w[shared:]) or "(base)" for w in words]


def _read_metrics(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object of metrics")
    return {k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def final_losses(run: Path) -> dict[str, float]:
    """`<stage> <name>` -> value of every finished stage's loss entries, stages in finishing order."""
    stages = [d for d in run.iterdir() if d.is_dir() and d.name != layout.EVAL
              and (d / layout.DONE).is_file() and (d / layout.METRICS).is_file()]
    out = {}
    for stage in sorted(stages, key=lambda d: (d / layout.DONE).stat().st_mtime):
        for name, value in _read_metrics(stage / layout.METRICS).items():
            if "loss" in name:
                out[f"{stage.name} {name}"] = value
    return out


def run_summary(run: str | Path) -> dict:
    """{"name", "axes", "eval" (metrics or None), "losses"} of one run folder."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: run folder not found")
    metrics = run / layout.EVAL / layout.METRICS
    return {"name": run.name, "axes": run_axes(run.name),
            "eval": _read_metrics(metrics) if metrics.is_file() else None, "losses": final_losses(run)}


def format_cell(value) -> str:
    """A table cell: 4 significant digits for floats, "–" for a missing value."""
    if value is None:
        return MISSING_CELL
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _union(dicts: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for d in dicts for k in d))


def comparison_table(runs: list[str | Path]) -> str:
    """The markdown table of the module doc (runs as columns)."""
    if not runs:
        raise ValueError("compare: give at least one run folder")
    summaries = [run_summary(r) for r in runs]
    names = [s["name"] for s in summaries]
    if len(set(names)) < len(names):
        names = [str(Path(r)) for r in runs]  # same folder names under different parents
    rows = [("variant", variants(names))] if len(summaries) > 1 else []
    rows += [(k, [s["axes"].get(k) for s in summaries]) for k in _union([s["axes"] for s in summaries])]
    evals = [s["eval"] or {} for s in summaries]
    rows += [(k, [e.get(k) for e in evals]) for k in _union(evals)]
    losses = [s["losses"] for s in summaries]
    rows += [(k, [x.get(k) for x in losses]) for k in _union(losses)]
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {k} | " + " | ".join(format_cell(v) for v in values) + " |" for k, values in rows]
    absent = [n for n, s in zip(names, summaries) if s["eval"] is None]
    if absent:
        lines += ["", f"No evaluation (`{layout.EVAL}/metrics.json`) in: {', '.join(absent)}."]
    return "\n".join(lines) + "\n"
