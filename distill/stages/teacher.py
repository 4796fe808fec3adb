"""The `teacher` stage: fine-tune Wan into the bidirectional next-shot teacher (ShotStream §4.1).

Each micro-batch is a set of (history, target shot) samples of equal context length. Noise is put
on the target only (x_t = (1-σ)x0 + σε); the model runs the clean context at t = 0 and returns the
target frames, so the rectified-flow loss ‖v - (ε - x0)‖² covers target tokens only. With
probability `teacher.context_dropout` a whole micro-batch trains without its context (per batch, not
per sample: the samples of a batch share one sequence length, and a mixed batch would need padding
and attention masks the Wan blocks do not take); that is what lets samplers run without a history.
With probability `teacher.text_dropout` a sample trains with every frame's text zeroed (the official
release drops 10%), which trains the unconditional branch that CFG uses in ODE pairs and DMD.
With `data.context.noise.shot` the context frames are noised, each at its own drawn timestep that the
model sees (distill/context_noise.py); with `data.context.negative.p` some histories hold an
irrelevant shot of another record (distill/data/negatives.py); with `data.context.references.p` some
contexts start with crops of the target shot's characters as references (distill/data/references.py).

Timesteps are stratified: sample i of step s falls in stratum (s·B + i) mod K of K equal-probability
strata of u ∈ [0, 1), drawn uniformly inside it, then shifted by `teacher.timestep_shift`. Every
rank and micro-batch of a step therefore covers the same strata, so the per-stratum losses
(`teacher/loss_t<lo>-<hi>`, means over the current logging window) are the same set of scalars on
all ranks, and every stratum shows up within K samples.

With `teacher.ema_decay` > 0 an EMA of the trainable weights (distill/ema.py, checkpointed with the
run) replaces them at the end, as the DMD generator's does.

At the end the teacher is saved to `<stage>/model/` (diffusers folder + settings json) and a few
next shots are sampled with and without context and scored against the world's facts.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from distill import keys, layout
from distill.context_noise import check_range, noise_context
from distill.data.components import shot_stream
from distill.data.negatives import check_negative
from distill.data.references import check_references
from distill.ema import EMA
from distill.logging import log_final
from distill.models import build_teacher, save_teacher
from distill.trainer import TrainedModel, Trainer
from student.context import drop_text, kwargs_of
from teacher.flow import NUM_TRAIN_TIMESTEPS, add_noise, shift_timestep, velocity_target
from teacher.model import NextShotTeacher



class StratifiedTimesteps:
    """Stratified training timesteps and the per-stratum loss means of the current log window."""

    def __init__(self, strata: int, shift: float, window: int) -> None:
        self.strata, self.shift, self.window = strata, shift, window
        edges = shift_timestep(torch.linspace(0, NUM_TRAIN_TIMESTEPS, strata + 1, dtype=torch.float64), shift)
        self.names = [f"loss_t{lo:.0f}-{hi:.0f}" for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist())]
        self._window_id = None
        self._sums = torch.zeros(strata, dtype=torch.float64)
        self._counts = torch.zeros(strata, dtype=torch.float64)

    def draw(self, step: int, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps [B] float32 on `device`, strata [B] long) for the samples of one micro-batch."""
        strata = (step * batch + torch.arange(batch)) % self.strata
        u = (strata + torch.rand(batch, dtype=torch.float64)) / self.strata
        t = shift_timestep(u * NUM_TRAIN_TIMESTEPS, self.shift)
        return t.to(device=device, dtype=torch.float32), strata

    def record(self, step: int, strata: torch.Tensor, losses: torch.Tensor) -> dict[str, float]:
        """Add per-sample losses; return the window mean of every stratum the window has seen."""
        window_id = step // self.window
        if window_id != self._window_id:
            self._window_id = window_id
            self._sums.zero_()
            self._counts.zero_()
        self._sums.index_add_(0, strata, losses.detach().double().cpu())
        self._counts.index_add_(0, strata, torch.ones_like(strata, dtype=torch.float64))
        return {self.names[k]: float(self._sums[k] / self._counts[k])
                for k in range(self.strata) if self._counts[k] > 0}


class TeacherStage:
    """Recipe `stage: teacher`; metrics: final losses, the colour-consistency evaluation."""

    folder = "teacher"
    produces = "teacher"
    reads = keys.TRAINING + ("optim.teacher", "data.prepared", "data.context", "codec", "text_encoder", "model",
                             "teacher", "sampler")

    @staticmethod
    def check(cfg: DictConfig) -> None:
        """Teacher keys that omegaconf cannot range-check, before any compute."""
        t = cfg.teacher
        for name in ("context_dropout", "text_dropout"):
            if not 0.0 <= t[name] <= 1.0:
                raise ValueError(f"teacher.{name} must be in [0, 1], got {t[name]}")
        if cfg.text_encoder.caption_layout == "joint" and t.captions != "target_only":
            raise ValueError("text_encoder.caption_layout=joint gives every frame one text: it needs "
                             f"teacher.captions=target_only, got {t.captions!r}")
        if t.timestep_shift <= 0 or cfg.sampler.shift <= 0:
            raise ValueError("teacher.timestep_shift and sampler.shift must be > 0")
        if not 0.0 <= t.ema_decay < 1.0 or t.ema_start < 0:
            raise ValueError(f"teacher.ema_decay must be in [0, 1) and teacher.ema_start >= 0; got {t.ema_decay}, "
                             f"{t.ema_start}")
        if t.loss_buckets < 1 or t.eval_samples < 0 or cfg.sampler.steps < 1:
            raise ValueError("teacher.loss_buckets and sampler.steps must be >= 1, teacher.eval_samples >= 0")
        check_context_keys(cfg, t.injection, t.context_timestep)

    def __init__(self, cfg: DictConfig, ctx) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.timesteps = StratifiedTimesteps(cfg.teacher.loss_buckets, cfg.teacher.timestep_shift,
                                             cfg.logging.every)

    def run(self) -> dict[str, float]:
        from distill.eval.probes import next_shot_colour
        from distill.eval.run import EvalRun

        cfg, env = self.cfg, self.ctx.env
        teacher = trainable_teacher(cfg)
        data = shot_stream(cfg, env.rank, env.world_size)
        ema = EMA(teacher, cfg.teacher.ema_decay, cfg.teacher.ema_start)
        self.trainer = Trainer(cfg, self.ctx, [TrainedModel("teacher", teacher, after_update=ema.update)], data,
                               self.step, extra_state={"ema": ema})
        metrics = self.trainer.fit()
        engine = self.trainer.engines["teacher"]
        if ema.enabled:
            ema.copy_to()  # the averaged weights are the teacher every later stage samples
        save_teacher(engine, layout.product(self.ctx.stage_dir, self.produces), env)
        scores = next_shot_colour(engine, cfg, EvalRun.of(env, cfg.run.seed))
        if scores:
            log_final(self.ctx, cfg, scores)
        return {**metrics, **scores}

    def step(self, batch: dict, due: frozenset, step: int) -> dict[str, torch.Tensor]:
        """Rectified-flow loss of one micro-batch (target tokens only), plus its logged scalars."""
        engine = self.trainer.engines["teacher"]
        device = self.ctx.env.device
        dtype = next(engine.module.parameters()).dtype
        x0 = batch["latents"].to(device, torch.float32)
        noise = torch.randn_like(x0)
        t, strata = self.timesteps.draw(step, x0.shape[0], device)
        x_t = add_noise(x0, noise, t)
        context = batch["context"].nonempty
        use_context = context is not None and bool(torch.rand(()) >= self.cfg.teacher.context_dropout)
        context = context.to(device, dtype) if use_context else None
        text, context, dropped = drop_text(batch["text"].to(device, dtype), context, self.cfg.teacher.text_dropout)
        context = noise_context(context, self.cfg.data.context.noise.shot)
        v = engine(x_t.to(dtype), t, text, **kwargs_of(context))
        per_sample = (v.float() - velocity_target(x0, noise)).pow(2).flatten(1).mean(1)
        return {"teacher": per_sample.mean(), "context_used": torch.tensor(float(use_context)),
                "text_dropped": dropped.float().mean(), **self.timesteps.record(step, strata, per_sample)}


def check_context_keys(cfg: DictConfig, injection: str, context_timestep: str) -> None:
    """`data.context.noise` / `negative` keys, before any compute: noised frames carry their timestep as
    context tokens, which only frame_concat with clean context at t = 0 has."""
    lo, hi = check_range(cfg.data.context.noise.shot, "data.context.noise.shot")
    if hi > 0 and (injection != "frame_concat" or context_timestep != "zero"):
        raise ValueError(f"data.context.noise.shot={[lo, hi]} needs teacher.injection=frame_concat and "
                         f"teacher.context_timestep=zero (context tokens that carry their own timestep); got "
                         f"{injection}, {context_timestep}")
    check_negative(cfg.data.context.negative.p, cfg.data.context.negative.frames)
    check_references(cfg.data.context.references.p, cfg.data.context.references.max)


def trainable_teacher(cfg: DictConfig) -> NextShotTeacher:
    """The recipe's fresh teacher with `teacher.trainable` and gradient checkpointing applied."""
    teacher = build_teacher(cfg)
    teacher.set_trainable()
    teacher.enable_gradient_checkpointing(cfg.train.gradient_checkpointing)
    return teacher
