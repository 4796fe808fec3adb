"""The recipe schema: every key a recipe may set, its type, default and a one-line doc.

A recipe is a YAML file validated against `Recipe` in omegaconf struct mode before any compute, so
a misspelled key, a wrong type or a missing mandatory value fails with the full key named (and
omegaconf's "Did you mean" hint) instead of passing silently. A recipe may extend another with
`base: other.yaml` (resolved relative to the recipe, chained, deep-merged, lists replaced);
command-line overrides are `key=value` dotlists applied last.

Keys are declared with `key(default, doc)` or `choice(default, options, doc)`; the doc travels in the
dataclass field metadata, `shotdistill config --docs` prints it, and a test checks that no key lacks
one. Stage-specific sections live beside the core ones at the end of this file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A recipe problem, reported as one line naming the file and/or the full key."""


def key(default: Any, doc: str) -> Any:
    """Declare a recipe key with its default (or MISSING) and its one-line doc."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return field(default_factory=default, metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def choice(default: Any, options: tuple, doc: str) -> Any:
    """Declare a key whose value must be one of `options`."""
    return field(default=default, metadata={"doc": doc, "choices": tuple(options)})


def section(cls: type, doc: str) -> Any:
    """Declare a nested section."""
    return field(default_factory=cls, metadata={"doc": doc})


# --------------------------------------------------------------------------- core sections


@dataclass
class RunConfig:
    name: str = key(MISSING, "run folder name: outputs go to <out>/<name>/")
    out: str = key("runs", "parent folder of run folders (relative to the working directory)")
    seed: int = key(0, "global seed: model init, data order, noise; each rank offsets it by its rank")


@dataclass
class TrainConfig:
    steps: int = key(100, "optimizer steps of the stage (for DMD: critic steps)")
    micro_batch: int = key(1, "samples per rank per forward/backward")
    grad_accum: int = key(1, "micro-batches accumulated into one optimizer step")
    checkpoint_every: int = key(50, "save a checkpoint every N steps (and at the end)")
    keep_checkpoints: int = key(2, "how many committed checkpoints to keep (oldest deleted)")
    max_bad_steps: int = key(5, "consecutive non-finite steps tolerated before the run aborts")
    gradient_checkpointing: bool = key(False, "recompute block activations in backward to save memory")


@dataclass
class OptimConfig:
    lr: float = key(1e-4, "peak learning rate")
    betas: List[float] = key([0.9, 0.999], "AdamW betas (beta1, beta2)")
    weight_decay: float = key(0.0, "AdamW decoupled weight decay")
    eps: float = key(1e-8, "AdamW epsilon")
    warmup: int = key(0, "linear warmup steps from 0 to lr (counted in this model's updates)")
    clip: float = key(1.0, "gradient-norm clip; 0 disables clipping")


@dataclass
class OptimSection:
    teacher: OptimConfig = section(OptimConfig, "optimizer of the teacher (teacher stage)")
    student: OptimConfig = section(OptimConfig, "optimizer of the student (causal init stage)")
    generator: OptimConfig = section(OptimConfig, "optimizer of the DMD generator (the student)")
    critic: OptimConfig = section(OptimConfig, "optimizer of the DMD critic (fake score)")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = choice(2, (0, 1, 2, 3), "ZeRO stage of every trained engine")
    offload_optimizer: bool = key(False, "ZeRO-2/3: keep optimizer states in CPU memory")
    offload_params: bool = key(False, "ZeRO-3: keep parameters in CPU memory")
    bf16: bool = key(True, "bf16 mixed precision on GPU (CPU always trains in fp32)")
    reduce_bucket_size: int = key(50_000_000, "elements per gradient reduce bucket")
    allgather_bucket_size: int = key(50_000_000, "elements per ZeRO-2 all-gather bucket")
    prefetch_bucket_size: int = key(50_000_000, "ZeRO-3: elements prefetched ahead of use")
    param_persistence_threshold: int = key(100_000, "ZeRO-3: params smaller than this stay whole")
    frozen_zero3: bool = key(False, "partition frozen models (teacher/real score) with ZeRO-3 too")


@dataclass
class LoggingConfig:
    every: int = key(10, "log scalars to TensorBoard every N steps")
    tensorboard: bool = key(True, "write TensorBoard events under <run>/tb/<stage>/")
    progress: bool = key(True, "show a progress bar on rank 0")


# --------------------------------------------------------------------------- the recipe


@dataclass
class Recipe:
    stage: str = key(MISSING, "what this recipe runs: a stage name (see `shotdistill config --stages`), "
                     "'pipeline', or 'package.module:Class' for a custom stage")
    needs: List[str] = key([], "recipes (relative to this one) whose stage outputs this stage reads; "
                      "each is run first when its output is missing")
    pipeline: List[str] = key([], "stage: pipeline — recipes (relative to this one) run in order")
    resume: str = key("auto", "auto (newest committed checkpoint) | never | a checkpoint folder path")
    run: RunConfig = section(RunConfig, "run identity and seed")
    train: TrainConfig = section(TrainConfig, "training loop of the stage")
    optim: OptimSection = section(OptimSection, "one optimizer per trained model")
    deepspeed: DeepSpeedConfig = section(DeepSpeedConfig, "DeepSpeed engines (the JSON is derived from it)")
    logging: LoggingConfig = section(LoggingConfig, "TensorBoard and progress output")


# --------------------------------------------------------------------------- loading


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: recipe not found") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    return data


def _merge(base: dict, top: dict) -> dict:
    """Deep-merge mappings; lists and scalars in `top` replace those in `base`."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_recipe_chain(path: str | Path, _seen: tuple = ()) -> dict:
    """The recipe at `path` with its `base:` chain merged under it (plain data, not validated)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a recipe path, got {base!r}")
    return _merge(read_recipe_chain(path.parent / base, _seen + (path,)), data)


def _one_line(e: OmegaConfBaseException) -> str:
    """omegaconf's message without its object_type lines, keeping full_key and the hint."""
    msg = str(e).splitlines()[0].strip()
    full_key = getattr(e, "full_key", None)
    return f"{full_key}: {msg}" if full_key else msg


def schema() -> DictConfig:
    cfg = OmegaConf.structured(Recipe)
    OmegaConf.set_struct(cfg, True)
    return cfg


def load_recipe(path: str | Path, overrides: list[str] = ()) -> DictConfig:
    """Load, merge, override and validate a recipe; raise ConfigError with one line on any problem."""
    path = Path(path)
    data = read_recipe_chain(path)
    cfg = schema()
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.create(data))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {_one_line(e)}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {item!r}: {_one_line(e)}") from None
    validate(cfg, source=str(path))
    OmegaConf.set_readonly(cfg, True)
    return cfg


def validate(cfg: DictConfig, source: str = "recipe") -> None:
    """Missing values, choices and interpolations, checked over the whole tree before any compute."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{source}: missing mandatory value for {', '.join(missing)}")
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {_one_line(e)}") from None
    for full_key, value, meta in _walk(Recipe, cfg):
        options = meta.get("choices")
        if options is not None and value not in options:
            raise ConfigError(
                f"{source}: {full_key}: {value!r} is not one of {', '.join(map(str, options))}")
    if cfg.train.steps < 0 or cfg.train.micro_batch < 1 or cfg.train.grad_accum < 1:
        raise ConfigError(f"{source}: train.steps must be >= 0, train.micro_batch and "
                          "train.grad_accum >= 1")
    if cfg.train.checkpoint_every < 1 or cfg.train.keep_checkpoints < 1 or cfg.logging.every < 1:
        raise ConfigError(f"{source}: train.checkpoint_every, train.keep_checkpoints and "
                          "logging.every must be >= 1")


def _walk(cls: type, node: Any, prefix: str = ""):
    """Yield (full_key, value, field metadata) for every leaf key of dataclass `cls` in `node`."""
    for f in dataclasses.fields(cls):
        full_key = f"{prefix}{f.name}"
        value = None if node is None or OmegaConf.is_missing(node, f.name) else node[f.name]
        sub = f.type if isinstance(f.type, type) else _resolve_type(cls, f)
        if dataclasses.is_dataclass(sub):
            yield from _walk(sub, value, full_key + ".")
        else:
            yield full_key, value, dict(f.metadata)


def _resolve_type(cls: type, f: dataclasses.Field) -> Any:
    import typing
    return typing.get_type_hints(cls).get(f.name)


def key_docs() -> list[tuple[str, Any, str]]:
    """(full key, default, doc) for every leaf key of the schema, in declaration order."""
    rows = []
    for full_key, default, meta in _walk(Recipe, schema()):
        if isinstance(default, (DictConfig, ListConfig)):
            default = OmegaConf.to_container(default)
        rows.append((full_key, "???" if default is None else default, meta.get("doc", "")))
    return rows


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
