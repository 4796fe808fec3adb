"""Teacher and DMD training steps, through our trainer and through a bare PyTorch loop, for benchmarks.

Shared by `benchmarks/overhead.py` (CPU, the tiny recipes) and `benchmarks/gpu.py` (one GPU, a
Wan2.1-1.3B-shaped random model). The step functions are the stages' own (`TeacherStage.step`,
`DMDStage.step`); only the set-up that a stage's `run()` does from its input folders is done here
from random models, so no prepared folder or trained teacher is needed.

- `trainer` mode: `distill.trainer.Trainer` (DeepSpeed engine per trained model, TensorBoard
  logging, the stop-signal collective, our step counter, checkpoint bookkeeping); timed per loop
  iteration of `Trainer.fit` (from one `train_step` to the next, so logging and the per-step
  bookkeeping count; the final checkpoint save is timed apart).
- `bare` mode: the same modules, the same step function and batches, `torch.optim.AdamW` and
  `clip_grad_norm_`; nothing else.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig

from distill.config import load_recipe
from distill.distributed import DistEnv, init_distributed
from distill.memory import WAN_1_3B_CONFIG
from distill.stages.base import StageContext
from student.context import Context

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny"


# ------------------------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Shape:
    """What one sample is: target latents [C, F, h, w], context frames, text [L, D]."""

    channels: int
    frames: int
    height: int
    width: int
    context: int
    text_len: int
    text_dim: int
    patch: tuple[int, int, int]

    @property
    def frame_tokens(self) -> int:
        return (self.height // self.patch[1]) * (self.width // self.patch[2])


WAN_1_3B = Shape(16, 21, 60, 104, 6, 512, 4096, (1, 2, 2))  # 832x480, 81 frames, context budget 6


def tiny_shape(cfg: DictConfig) -> Shape:
    from distill.models import latent_channels, text_dim
    from teacher.encoders import text_length

    p = cfg.codec.patch
    return Shape(latent_channels(cfg.codec), cfg.data.shot_frames, cfg.data.height // p, cfg.data.width // p,
                 cfg.data.context.budget, text_length(cfg.text_encoder.max_tokens), text_dim(cfg.text_encoder),
                 tuple(cfg.model.patch_size))


def recipe(name: str, run_out: Path, overrides: list[str] = ()) -> DictConfig:
    """A tiny recipe (recipes/tiny/<name>.yaml) writing into run_out."""
    return load_recipe(TINY / f"{name}.yaml", [f"run.out={run_out}", "run.name=bench", "resume=never",
                                                "logging.progress=false", *overrides])


def wan_1_3b_overrides(steps: int) -> list[str]:
    """The tiny recipes reshaped to Wan2.1-1.3B's training geometry (micro-batch 1, checkpointing, bf16)."""
    return [f"train.steps={steps}", "train.micro_batch=1", "train.grad_accum=1", "train.gradient_checkpointing=true",
            "deepspeed.bf16=true", "deepspeed.zero_stage=2", "teacher.trainable=self_attention",
            "student.chunk_frames=3", "student.local_chunks=7", "data.context.budget=6", "dmd.sample_every=0",
            "dmd.guidance=3.0", "teacher.context_dropout=0.0"]


def random_teacher(cfg: DictConfig, shape: Shape | None, device: torch.device):
    """A random next-shot teacher: the tiny recipe's Wan, or Wan2.1-1.3B's architecture built on `device`."""
    from distill.models import build_teacher, teacher_settings, use_attention
    from teacher.model import NextShotTeacher

    torch.manual_seed(cfg.run.seed)
    if shape is None:
        return build_teacher(cfg)
    from diffusers import WanTransformer3DModel

    with torch.device(device):
        wan = WanTransformer3DModel(**WAN_1_3B_CONFIG)
    return use_attention(NextShotTeacher(wan, **teacher_settings(cfg)), cfg.model.attention)


def random_batch(shape: Shape, batch: int, seed: int = 0) -> dict:
    """A teacher / intra-shot DMD micro-batch with a full context (the stages' batch layout)."""
    g = torch.Generator().manual_seed(seed)
    s = shape
    return {"latents": torch.randn(batch, s.channels, s.frames, s.height, s.width, generator=g),
            "text": torch.randn(batch, s.text_len, s.text_dim, generator=g),
            "context": Context(torch.randn(batch, s.channels, s.context, s.height, s.width, generator=g),
                               torch.randn(batch, s.context, s.text_len, s.text_dim, generator=g),
                               torch.zeros(batch, s.context, dtype=torch.long)),
            "target_shot": torch.ones(batch, dtype=torch.long), "record": [f"r{i}" for i in range(batch)]}


class InMemory:
    """A DataSource over batches held in memory (cycled); its position is checkpointed like a stream's."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches, self.index = batches, 0

    def __next__(self) -> dict:
        batch = self.batches[self.index % len(self.batches)]
        self.index += 1
        return batch

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]


def collect(stream, count: int) -> list[dict]:
    """The first `count` batches of a data stream, held in memory (the same batches, without the data path)."""
    return [next(stream) for _ in range(count)]


# ------------------------------------------------------------------------------------------------- set-up


def environment() -> DistEnv:
    return init_distributed(600)


def context(cfg: DictConfig, env: DistEnv, folder: str) -> StageContext:
    run_dir = Path(cfg.run.out) / cfg.run.name
    stage_dir = run_dir / folder
    stage_dir.mkdir(parents=True, exist_ok=True)
    return StageContext(run_dir=run_dir, stage_dir=stage_dir, tb_dir=run_dir / "tb" / folder, env=env,
                        recipe=Path(cfg.run.out) / "bench.yaml")


class _Engine:
    """A plain module where a stage's step expects an engine (called, and `.module`)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


class _Engines:
    """What a stage's step reads from `self.trainer` in the bare loop."""

    def __init__(self, engines: dict[str, torch.nn.Module]) -> None:
        self.engines = {name: _Engine(module) for name, module in engines.items()}


@dataclass
class Harness:
    """One stage's step with its trained models, ready for `trainer` or `bare` runs."""

    stage: Any
    models: list  # TrainedModel
    data: Any
    extra_state: dict = field(default_factory=dict)
    tokens_per_step: int = 0


def teacher_harness(cfg: DictConfig, env: DistEnv, data, shape: Shape | None = None) -> Harness:
    """The teacher stage's step around a random teacher (`teacher.trainable`, checkpointing as the recipe)."""
    from distill.stages.teacher import TeacherStage
    from distill.trainer import TrainedModel

    teacher = random_teacher(cfg, shape, env.device)
    teacher.set_trainable()
    teacher.enable_gradient_checkpointing(cfg.train.gradient_checkpointing)
    stage = TeacherStage(cfg, context(cfg, env, "teacher"))
    s = shape or tiny_shape(cfg)
    tokens = cfg.train.micro_batch * (s.context + s.frames) // s.patch[0] * s.frame_tokens
    return Harness(stage, [TrainedModel("teacher", teacher)], data, tokens_per_step=tokens)


def dmd_harness(cfg: DictConfig, env: DistEnv, data, shape: Shape | None = None) -> Harness:
    """The intra-shot DMD stage's step: generator (a student copied from a random teacher), critic (a
    copy of the teacher, trained) and real score (the teacher, frozen), as `DMDStage.run` sets them up."""
    from distill.data.components import build_codec, negative_text
    from distill.ema import EMA
    from distill.eval.media import MediaLog
    from distill.models import build_student
    from distill.rollout import SelfForcingGenerator, latent_context_fn
    from distill.stages.dmd import DMDIntraStage
    from distill.trainer import TrainedModel, place_frozen

    teacher = random_teacher(cfg, shape, env.device)
    student = build_student(cfg, copy.deepcopy(teacher))
    critic = copy.deepcopy(teacher).train().requires_grad_(True)
    critic.enable_gradient_checkpointing(cfg.train.gradient_checkpointing)
    stage = DMDIntraStage(cfg, context(cfg, env, "dmd-intra"))
    stage.real = place_frozen(teacher, cfg, env)
    s = shape or tiny_shape(cfg)
    stage.codec = build_codec(cfg.codec, env.device) if shape is None else None
    # what DMDStage.run and _geometry set from the needed folders and the prepared data
    stage.chunks, stage.student_chunk = s.frames // cfg.student.chunk_frames, cfg.student.chunk_frames
    stage.height, stage.width = s.height, s.width
    stage.context_fn = latent_context_fn(cfg.data.context.strategy, cfg.data.context.budget)
    guided = cfg.dmd.guidance != 0 or cfg.sampler.guidance_scale != 1
    stage.negative = None if not guided else (
        negative_text(cfg, env.device, stage.dtype)[0] if shape is None else
        torch.zeros(s.text_len, s.text_dim, device=env.device, dtype=stage.dtype))
    stage.media = MediaLog(stage.ctx.tb_dir, "dmd-intra", env.is_main, cfg.logging.tensorboard)
    stage.exit_steps = []
    generator = SelfForcingGenerator(student, lockstep=cfg.deepspeed.zero_stage == 3)
    stage.ema = EMA(generator, cfg.dmd.ema_decay, cfg.dmd.ema_start)
    models = [TrainedModel("generator", generator, cfg.dmd.generator_every, after_update=stage.ema.update),
              TrainedModel("critic", critic)]
    tokens = cfg.train.micro_batch * s.frames // s.patch[0] * s.frame_tokens
    return Harness(stage, models, data, {"ema": stage.ema}, tokens_per_step=tokens)


# ------------------------------------------------------------------------------------------------- runs


@dataclass
class Timing:
    """Seconds of each loop iteration (index = our step), and of what ran once outside the loop."""

    iterations: list[float]
    setup_s: float = 0.0
    save_s: float = 0.0
    peak_bytes: int | None = None
    flops: dict[int, dict[str, float]] = field(default_factory=dict)

    def mean(self, start: int, stop: int | None = None) -> float:
        chosen = self.iterations[start:stop]
        return sum(chosen) / len(chosen)


def _clock(env: DistEnv) -> float:
    if env.cuda:
        torch.cuda.synchronize()
    return time.perf_counter()


def run_trainer(h: Harness, cfg: DictConfig, env: DistEnv, save: bool = True,
                count_flops_at: tuple[int, ...] = ()) -> Timing:
    """`Trainer.fit` for `train.steps` steps; iteration i = from train_step i's start to train_step i+1's.
    `save=False` skips checkpoint writes (a 1.3B checkpoint is tens of GB); the steps in `count_flops_at`
    run under torch's FLOP counter (slower: not for timing)."""
    from distill.trainer import Trainer

    t0 = _clock(env)
    trainer = Trainer(cfg, h.stage.ctx, h.models, h.data, h.stage.step, extra_state=h.extra_state)
    h.stage.trainer = trainer
    setup = _clock(env) - t0
    starts: list[float] = []
    saves: list[float] = []
    flops: dict[int, dict[str, float]] = {}
    step, save_fn = trainer.train_step, trainer.save

    def timed_step():
        starts.append(_clock(env))
        if trainer.step in count_flops_at:
            out, flops[trainer.step] = _counted(trainer, step, cfg.train.gradient_checkpointing)
            return out
        return step()

    def timed_save():
        t = _clock(env)
        folder = save_fn() if save else None
        saves.append(_clock(env) - t)
        return folder
    trainer.train_step, trainer.save = timed_step, timed_save
    if env.cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit()
    end = _clock(env) - sum(saves[-1:])  # the last iteration without the final save
    bounds = starts + [end]
    peak = torch.cuda.max_memory_allocated() if env.cuda else None
    return Timing([b - a for a, b in zip(bounds, bounds[1:])], setup, sum(saves), peak, flops)


def _counted(trainer, train_step: Callable[[], Any], recompute: bool) -> tuple[Any, dict[str, float]]:
    """One train_step under torch.utils.flop_counter: executed FLOPs (forward, backward with checkpoint
    recompute) and model FLOPs = forward + 2 x the forward of the passes with gradient. With
    checkpointing the backward executes 3 x that forward (2 x for gradients, 1 x recompute), so
    model = forward + 2/3 x backward; without it, forward + backward."""
    from torch.utils.flop_counter import FlopCounterMode

    forward = {"flops": 0}
    inner = trainer.step_fn

    def counted(*args):
        with FlopCounterMode(display=False) as counter:
            out = inner(*args)
        forward["flops"] += counter.get_total_flops()
        return out
    trainer.step_fn = counted
    try:
        with FlopCounterMode(display=False) as total:
            out = train_step()
    finally:
        trainer.step_fn = inner
    executed = total.get_total_flops()
    backward = executed - forward["flops"]
    model = forward["flops"] + (2 / 3 if recompute else 1.0) * backward
    return out, {"executed": float(executed), "model": float(model), "forward": float(forward["flops"])}


def run_bare(h: Harness, cfg: DictConfig, env: DistEnv, steps: int) -> Timing:
    """The same modules, step function and batches in a plain loop: backward, clip, AdamW, zero_grad."""
    t0 = _clock(env)
    modules = {m.name: m.module.to(env.device) for m in h.models}
    optimizers = {}
    for m in h.models:
        o = cfg.optim[m.name]
        params = [p for p in m.module.parameters() if p.requires_grad]
        optimizers[m.name] = (torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                                weight_decay=o.weight_decay), params, o.clip)
    h.stage.trainer = _Engines(modules)
    setup = _clock(env) - t0
    starts = []
    for step in range(steps):
        starts.append(_clock(env))
        due = frozenset(m.name for m in h.models if step % m.every == 0)
        out = h.stage.step(next(h.data), due, step)
        for name in (m.name for m in h.models if m.name in due):
            out[name].backward()
        for name in due:
            optimizer, params, clip = optimizers[name]
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    bounds = starts + [_clock(env)]
    return Timing([b - a for a, b in zip(bounds, bounds[1:])], setup)


def time_callable(fn: Callable[[], Any], env: DistEnv) -> float:
    t = _clock(env)
    fn()
    return _clock(env) - t
