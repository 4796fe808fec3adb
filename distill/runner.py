"""Run a recipe: load and validate the whole recipe tree, then run stages in dependency order.

A recipe runs one stage, or (`stage: pipeline`) the recipes listed in `pipeline:` in order. A
recipe's `needs:` are run first when their stage folder has no `DONE`. Every recipe of the tree is
loaded and validated before anything computes.

Overrides: the command line's `key=value` overrides apply to every recipe of the tree (so
`train.steps=2` shrinks a whole pipeline), and every needed or pipelined recipe inherits
`run.name` and `run.out` from the invoked recipe, so the whole tree writes into one run folder.

One run folder, one writer: rank 0 holds an exclusive lock on `<run>/.lock` (flock: the kernel
releases it however the process ends) for the whole run; a second run into the folder stops at once,
on every rank, with one line naming the holder's host and pid.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from distill import keys, layout
from distill.config import ConfigError, load_recipe, to_yaml


@dataclass
class Node:
    """One loaded recipe: a stage (cls, folder) or a pipeline (steps), with its needs."""

    path: Path
    cfg: DictConfig
    cls: type | None = None
    folder: str | None = None
    needs: list["Node"] = field(default_factory=list)
    steps: list["Node"] = field(default_factory=list)


def plan(path: str | Path, overrides: list[str], top: DictConfig | None = None,
         _seen: tuple = ()) -> Node:
    """Load and validate `path` and, recursively, everything it needs or pipelines (distill/keys.py:
    every key set must be one its stage can honour)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: recipe needs itself (via {' -> '.join(p.name for p in _seen)})")
    inherited = [] if top is None else [f"run.name={top.run.name}", f"run.out={top.run.out}"]
    cfg = load_recipe(path, list(overrides) + inherited)
    if cfg.overrides:  # the recipe's tree-wide overrides (ablations), before the command line's
        overrides = list(cfg.overrides) + list(overrides)
        cfg = load_recipe(path, overrides + inherited)
    node = Node(path=path, cfg=cfg)
    sub = lambda rel: plan(path.parent / rel, overrides, top or cfg, _seen + (path,))  # noqa: E731
    node.needs = [sub(rel) for rel in cfg.needs]
    if cfg.stage == "pipeline":
        if not cfg.pipeline:
            raise ConfigError(f"{path}: stage 'pipeline' needs a non-empty 'pipeline' list")
        node.steps = [sub(rel) for rel in cfg.pipeline]
    elif cfg.pipeline:
        raise ConfigError(f"{path}: 'pipeline' is only read when stage is 'pipeline'")
    else:
        _stage_node(node)
    keys.check_own_keys(path, cfg, node.cls, node.folder)
    if top is None:  # the whole tree is planned: the tree-wide overrides and the stages' inputs
        keys.check_overrides(overrides, [(n.cls, n.folder, n.cfg) for n in _stages(node)])
        run_dir = layout.run_dir(cfg.run.out, cfg.run.name)
        for n in _stages(node):
            keys.check_sources(n.path, n.cfg, n.cls, n.folder, {m.folder: m.cfg for m in n.needs if m.folder},
                               run_dir)
        for n in _stages(node):
            recorded_changes(n, run_dir)  # a finished or checkpointed stage made with other keys stops here
    return node


def recorded_changes(node: Node, run_dir: Path) -> tuple[str, list[str]]:
    """What the stage would reuse (its DONE, else with resume=auto|force its newest committed checkpoint)
    and how the keys it was made with differ from the planned ones (distill/keys.py fingerprints).
    Differences stop the run (ConfigError, before any compute) unless resume=force."""
    from distill import checkpoint
    stage_dir = run_dir / node.folder
    force = node.cfg.resume == "force"
    record = layout.done_record(stage_dir)
    if record is not None:
        what = f"{stage_dir}: finished stage {node.folder}"
        return what, keys.check_fingerprint(record.get("fingerprint"), keys.fingerprint(node.cls, node.cfg), what, force)
    done = checkpoint.committed(stage_dir / layout.CHECKPOINTS) if node.cfg.resume in ("auto", "force") else []
    if not done:
        return "", []
    what = f"checkpoint {done[-1][1]}"
    return what, keys.check_fingerprint(checkpoint.read_marker(done[-1][1]).get("fingerprint"),
                                        keys.fingerprint(node.cls, node.cfg, checkpoint=True), what, force)


def _stage_node(node: Node) -> None:
    """Resolve a stage recipe's class and folder and run the stage's own checks."""
    from distill.stages import folder_name, resolve

    try:
        node.cls = resolve(node.cfg.stage)
    except ValueError as e:
        raise ConfigError(f"{node.path}: {e}") from None
    node.folder = folder_name(node.cfg.stage, node.cls)
    check = getattr(node.cls, "check", None)
    if check is not None:
        check(node.cfg)  # a stage's own validation, still before any compute
    if node.cfg.train.steps < 1 and any(p in ("", "train", "train.steps") for p in keys.stage_reads(node.cls)):
        raise ConfigError(f"{node.path}: train.steps={node.cfg.train.steps} must be >= 1: stage {node.folder} "
                          "trains (with 0 steps it would finish an untrained model)")


def _stages(node: Node) -> list[Node]:
    """Every stage node of a planned tree, each folder once."""
    found: dict[str, Node] = {}
    for child in node.needs + node.steps:
        for n in _stages(child):
            found.setdefault(n.folder, n)
    if node.cls is not None:
        found.setdefault(node.folder, node)
    return list(found.values())


class Runner:
    """Executes a planned tree on this process's share of the job."""

    def __init__(self, root: Node, env):
        from distill.distributed import barrier
        self.root, self.env, self.barrier = root, env, barrier
        self.run_dir = layout.run_dir(root.cfg.run.out, root.cfg.run.name)
        self.summary: dict[str, dict] = {}

    def _write(self, path: Path, text: str) -> None:
        from teacher.files import write_atomic
        if self.env.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, text)

    def execute(self, node: Node) -> None:
        for need in node.needs:
            if need.folder is None or layout.done_record(self.run_dir / need.folder) is None:
                self.execute(need)
        for step in node.steps:
            self.execute(step)
        if node.cls is not None:
            self._stage(node)

    def _stage(self, node: Node) -> None:
        from distill.checkpoint import seed_all
        from distill.logging import write_run_info
        from distill.stages.base import StageContext
        stage_dir = self.run_dir / node.folder
        finished = layout.done_record(stage_dir)
        if finished is not None:
            self.summary[node.folder] = {**finished, "status": "done earlier"}
            return
        self._say_discarded(node, stage_dir)
        self._write(stage_dir / layout.CONFIG, to_yaml(node.cfg))
        self.barrier()
        force = node.cfg.resume == "force"
        ctx = StageContext(run_dir=self.run_dir, stage_dir=stage_dir,
                           tb_dir=layout.tb_dir(self.run_dir, node.folder), env=self.env,
                           recipe=node.path,
                           needs={n.folder: self.run_dir / n.folder for n in node.needs if n.folder},
                           fingerprint=keys.fingerprint(node.cls, node.cfg, checkpoint=True), force=force)
        write_run_info(ctx.tb_dir, node.cfg, main=self.env.is_main)  # HParams + custom-scalars layout
        seed_all(node.cfg.run.seed)  # model init must match on every rank
        t0 = time.perf_counter()
        # resume=force resumes as auto does, without comparing fingerprints (ctx.force)
        stage = node.cls(OmegaConf.merge(node.cfg, {"resume": "auto"}) if force else node.cfg, ctx)
        metrics = stage.run()
        record = {"metrics": metrics, "wall_s": round(time.perf_counter() - t0, 3),
                  "produces": getattr(node.cls, "produces", None), "finished": time.time(),
                  "fingerprint": keys.fingerprint(node.cls, node.cfg)}
        if getattr(stage, "summary_table", None):  # a stage's own table for the summary (eval: per stage)
            record["table"] = stage.summary_table
        self.barrier()
        self._write(stage_dir / layout.METRICS, json.dumps(metrics, indent=2) + "\n")
        self._write(stage_dir / layout.DONE, json.dumps(record, indent=2) + "\n")  # last: marks finished
        self.barrier()
        self.summary[node.folder] = {**record, "status": "ran"}

    def _say_discarded(self, node: Node, stage_dir: Path) -> None:
        """resume=never starts the stage over: name the committed checkpoints that go."""
        from distill.checkpoint import committed
        found = committed(stage_dir / layout.CHECKPOINTS) if node.cfg.resume == "never" else []
        if found and self.env.is_main:
            steps = ", ".join(str(step) for step, _ in found)
            print(f"shotdistill: resume=never: stage {node.folder} starts over, discarding {len(found)} committed "
                  f"checkpoint(s) (steps {steps}) in {stage_dir / layout.CHECKPOINTS}", file=sys.stderr, flush=True)


def format_summary(summary: dict[str, dict]) -> str:
    """One line per stage: folder, status, wall time, final metrics (or, for a stage with a table of
    its own, that table under the line)."""
    lines = []
    for folder, rec in summary.items():
        metrics = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in rec.get("metrics", {}).items())
        if rec.get("table"):
            metrics = "\n" + rec["table"].rstrip("\n")
        lines.append(f"{folder:<16} {rec['status']:<12} {rec.get('wall_s', 0):>9.1f}s  {metrics}")
    return "\n".join(lines)


class RunLocked(RuntimeError):
    """Another process holds the run folder's lock."""


def lock_run(run_dir: Path) -> int:
    """Take the run folder's exclusive lock (layout.LOCK) and record this host and pid in it; return
    the open descriptor (closing it, or exiting, releases the lock). RunLocked names the holder."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / layout.LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        try:
            holder = json.loads(path.read_text())
            who = f"host {holder['host']}, pid {holder['pid']}"
        except (OSError, ValueError, KeyError, TypeError):
            who = "holder unknown"
        raise RunLocked(f"{run_dir}: another run is writing this folder ({who}); wait for it to end "
                        "or choose another run.name") from None
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps({"host": socket.gethostname(), "pid": os.getpid()}) + "\n").encode())
    return fd


@contextmanager
def run_lock(run_dir: Path, env):
    """Collective: rank 0 holds the run folder's lock inside the block; when it cannot, every rank
    raises RunLocked with rank 0's line (so no rank starts writing)."""
    from distill.distributed import broadcast_object

    fd, error = None, None
    if env.is_main:
        try:
            fd = lock_run(run_dir)
        except RunLocked as e:
            error = str(e)
    error = broadcast_object(error)
    if error is not None:
        raise RunLocked(error)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def run_recipe(path: str | Path, overrides: list[str] = ()) -> dict[str, dict]:
    """Validate the recipe tree, join the process group, lock the run folder, write config.yaml,
    run; return the per-stage summary (also printed on rank 0)."""
    from distill.distributed import init_distributed
    root = plan(path, list(overrides))
    env = init_distributed(root.cfg.run.dist_timeout)
    runner = Runner(root, env)
    with run_lock(runner.run_dir, env):
        stages = _stages(root)
        for node in stages:  # only resume=force lets differences through: say what it uses anyway
            what, changes = recorded_changes(node, runner.run_dir)
            if changes and env.is_main:
                print(f"shotdistill: resume=force: using {what} although it was made with other settings: "
                      f"{'; '.join(changes)}", file=sys.stderr, flush=True)
        if any(layout.done_record(runner.run_dir / n.folder) is None for n in stages):
            # the invoked recipe, when some stage of it runs (a run that only finds finished stages
            # leaves the config.yaml of the run that made them)
            runner._write(runner.run_dir / layout.CONFIG, to_yaml(root.cfg))
        runner.barrier()
        runner.execute(root)
    if env.is_main:
        print(format_summary(runner.summary), flush=True)
    return runner.summary
