"""Stages own their keys: which recipe keys a stage reads, and the checks that a key can take effect.

A stage class declares `reads`, the key prefixes it reads beyond `COMMON` (which every stage reads;
a stage class without `reads`, e.g. a user's own, may read anything), and `sources`, {key naming an
input stage: key prefixes that must agree with that input}. Before any compute the runner checks,
failing with one line that names the key and the stage:

1. every key a recipe file sets itself is read by its stage (keys it only inherits from its `base:`
   and leaves untouched are fine); a pipeline recipe sets only `COMMON` keys, since its stages load
   their own recipes and inherit nothing else from it;
2. every tree-wide override (the command line's `key=value`, a recipe's `overrides:`) is read by
   some stage of the tree;
3. the keys a stage shares with an input stage agree with what that input was built with: its
   recorded `config.yaml` when it has finished (it will not run again), else its planned recipe.
   E.g. `student.local_chunks` on a DMD recipe whose generator was built with another value, or a
   `data.context.budget` other than the one the student was initialised with, cannot take effect.

Fingerprints: the resolved keys a stage reads, minus `NEUTRAL` keys that cannot change its result
(logging, checkpoint cadence, collective timeouts, the run's name and place, memory layout), are
its fingerprint (`fingerprint`). The runner records it in the stage's `DONE` and the trainer in
every checkpoint's `COMMITTED` (without `train.steps`: a checkpoint may be trained on to another
length). A finished stage is reused, and a checkpoint resumed, only when the fingerprint still
matches; otherwise the run stops naming every differing key, old → new (`check_fingerprint`),
unless `resume=force`. A key the schema gained since, at its default, is no difference: defaults keep
what runs did before the key existed.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

from distill import layout
from distill.config import ConfigError, read_yaml

COMMON = ("stage", "needs", "pipeline", "resume", "overrides", "run", "logging")
TRAINING = ("train", "deepspeed")
# what a stage leaving a student folder describes in it (distill/models.py `student_components`)
STUDENT_FOLDER = ("codec", "text_encoder", "data.height", "data.width", "data.fps", "data.shot_frames")
# the context rule (which history frames a shot sees): what a student is built with, what ODE pairs and
# prepared context frames follow; data.context.noise / negative shape training only (teacher, dmd)
CONTEXT_RULE = ("data.context.strategy", "data.context.budget", "data.context.similarity", "data.context.pack_frames",
                "data.context.max_candidates")
RECIPE_ONLY = ("base",)  # recipe-file syntax, not a key of the schema
# keys that cannot change what a stage computes: they may differ from what a finished or checkpointed
# stage recorded (how it is logged and checkpointed, how long collectives wait, the run's name and place,
# which recipes are run, the attention kernel and DeepSpeed's memory layout, the abort threshold)
NEUTRAL = ("needs", "pipeline", "resume", "overrides", "run.name", "run.out", "run.dist_timeout", "logging",
           "train.checkpoint_every", "train.keep_checkpoints", "train.max_bad_steps", "train.gradient_checkpointing",
           "model.attention", "deepspeed.offload_optimizer", "deepspeed.offload_params",
           "deepspeed.reduce_bucket_size", "deepspeed.allgather_bucket_size", "deepspeed.prefetch_bucket_size",
           "deepspeed.param_persistence_threshold")
CHECKPOINT_NEUTRAL = ("train.steps",)  # a checkpoint may be trained on to another length


def _covers(prefix: str, key: str) -> bool:
    return prefix == "" or key == prefix or key.startswith(prefix + ".")


def flat_keys(data: Any, prefix: str = "") -> list[str]:
    """Dotted leaf keys of a recipe mapping (lists are values)."""
    if not isinstance(data, dict):
        return [prefix[:-1]]
    return [k for name, value in data.items() for k in flat_keys(value, f"{prefix}{name}.")]


def stage_reads(cls: type | None, cfg: DictConfig | None = None) -> tuple[str, ...]:
    """The key prefixes a stage class reads (COMMON for a pipeline), with the keys that those interpolate
    in `cfg` (a Wan recipe's `codec.path: ${model.path}` makes the prepare stage read model.path)."""
    if cls is not None and not hasattr(cls, "reads"):
        return ("",)  # a stage that declares nothing (a user's own) may read any key
    reads = COMMON + tuple(getattr(cls, "reads", ())) if cls is not None else COMMON
    if cfg is None:
        return reads
    raw = _flat(OmegaConf.to_container(cfg, resolve=False))
    used = {ref for key, value in raw.items() if any(_covers(p, key) for p in reads) and isinstance(value, str)
            for ref in re.findall(r"\$\{([^}:]+)\}", value)}
    return reads + tuple(sorted(used))


def _own_keys(path: Path) -> list[str]:
    """The keys a recipe file sets itself, without its base chain."""
    data = read_yaml(Path(path))
    return [k for k in flat_keys(data) if k not in RECIPE_ONLY]


def check_own_keys(path: Path, cfg: DictConfig, cls: type | None, folder: str | None) -> None:
    """Check 1 of the module doc."""
    reads = stage_reads(cls, cfg)
    for key in _own_keys(path):
        if not any(_covers(prefix, key) for prefix in reads):
            where = f"stage {folder}" if cls is not None else "a pipeline recipe (its stages load their own recipes)"
            raise ConfigError(f"{path}: {key} cannot take effect: {where} does not read it "
                              f"(it reads {', '.join(reads)})")


def check_overrides(overrides: Iterable[str], stages: list[tuple[type, str, DictConfig]]) -> None:
    """Check 2 of the module doc, over the tree's stages (class, folder, recipe)."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not any(any(_covers(p, key) for p in stage_reads(cls, cfg)) for cls, _, cfg in stages):
            folders = ", ".join(folder for _, folder, _ in stages)
            raise ConfigError(f"override {item!r}: {key} cannot take effect: no stage of this run reads it "
                              f"(stages: {folders})")


def _leaves(cfg: DictConfig, prefix: str) -> dict[str, Any]:
    node = OmegaConf.select(cfg, prefix)
    if isinstance(node, DictConfig):
        return {f"{prefix}.{k}": v for k, v in _flat(OmegaConf.to_container(node, resolve=True)).items()}
    return {prefix: OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node}


def _flat(data: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in data.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every key whose value differs, sorted (None: absent on that side)."""
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def check_sources(path: Path, cfg: DictConfig, cls: type, folder: str, needs: dict[str, DictConfig],
                  run_dir: Path) -> None:
    """Check 3 of the module doc; `needs` maps each needed stage folder to its planned recipe."""
    for key, prefixes in getattr(cls, "sources", {}).items():
        name = OmegaConf.select(cfg, key)
        if name not in needs:
            raise ConfigError(f"{path}: {key}={name!r} is not among the stages in `needs:` "
                              f"({', '.join(sorted(needs)) or 'none'})")
        built = run_dir / name / layout.CONFIG
        theirs = OmegaConf.load(built) if layout.done_record(run_dir / name) and built.is_file() else needs[name]
        state = "was built with" if theirs is not needs[name] else "is planned with"
        for prefix in prefixes:
            planned = _leaves(cfg, prefix)
            changed = [d for d in differences(_leaves(theirs, prefix), planned)
                       if d[0] in planned and not _added_default(*d)]  # a key added since, at its default
            for leaf, other, mine in changed[:1]:
                raise ConfigError(f"{path}: {leaf}={mine!r} cannot take effect in stage {folder}: "
                                  f"its input {key}={name!r} {state} {other!r}")


def fingerprint(cls: type | None, cfg: DictConfig, checkpoint: bool = False) -> dict:
    """{"sha256": digest, "keys": {key: value}}: the resolved keys of `cfg` the stage class `cls` reads,
    less NEUTRAL (and, for a checkpoint, CHECKPOINT_NEUTRAL) ones; JSON, for DONE and COMMITTED."""
    reads = stage_reads(cls, cfg)
    neutral = NEUTRAL + (CHECKPOINT_NEUTRAL if checkpoint else ())
    leaves = _flat(OmegaConf.to_container(cfg, resolve=True))
    shaping = {k: v for k, v in sorted(leaves.items())
               if any(_covers(p, k) for p in reads) and not any(_covers(n, k) for n in neutral)}
    digest = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]
    return {"sha256": digest, "keys": shaping}


def fingerprint_changes(recorded: dict | None, current: dict | None) -> list[str]:
    """'key: old → new' for every key the recorded fingerprint and the current one disagree on
    ([] when either is missing: made before fingerprints, or not checked)."""
    if not isinstance(recorded, dict) or not isinstance(current, dict) or "keys" not in recorded:
        return []
    if recorded.get("sha256") == current["sha256"]:
        return []
    absent = "(absent)"
    return [f"{k}: {absent if old is None else repr(old)} → {absent if new is None else repr(new)}"
            for k, old, new in differences(recorded["keys"], current["keys"]) if not _added_default(k, old, new)]


def _added_default(key: str, old: Any, new: Any) -> bool:
    """A key the schema gained after the record was made, at its default: a default keeps the behaviour
    from before the key existed (a rule of the schema), so it is no change."""
    from distill.config import schema

    if old is not None or new is None:
        return False
    default = OmegaConf.select(schema(), key, default=None)
    if OmegaConf.is_config(default):
        default = OmegaConf.to_container(default)
    return default is not None and default == new


def check_fingerprint(recorded: dict | None, current: dict | None, what: str, force: bool = False) -> list[str]:
    """Stop (ConfigError listing the differing keys) when `what` (a finished stage or a checkpoint) was
    made with other keys than the current ones, unless `force`; return the differences."""
    changes = fingerprint_changes(recorded, current)
    if changes and not force:
        raise ConfigError(f"{what} was made with other settings: {'; '.join(changes)}. Run with those values, "
                          "choose another run.name, or set resume=force to use it anyway")
    return changes
