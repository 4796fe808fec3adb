"""The `causal_init` stage: the causal student regresses the teacher's ODE pairs (CausVid; ShotStream §9).

The student starts as the teacher (`CausalStudent.from_teacher`: same weights, chunk-causal
attention) with every parameter trainable. For each pair of a micro-batch every chunk of
`student.chunk_frames` target frames draws its own index k into the K stored timesteps (different
noise levels per chunk); the input is, per chunk, the stored trajectory latent at k, and each frame's
timestep the k-th student timestep. With `causal_init.clean_level` (ShotStream, Self Forcing and
CausVid regress over [1000, 740, 500, 260, 0]-style lists) a chunk may also draw t = 0: its input
is the pair's clean end point and it carries no loss, so later chunks learn to attend to clean
earlier chunks, which is what the KV cache holds at inference. One full-sequence chunk-causal
forward with the history as a clean prefix at t = 0 predicts v; the loss is the MSE between
x0 = x_t − σ·v and the pair's clean end point over the noisy target frames.

Chunk indices come from the global torch RNG, which the trainer seeds per rank and checkpoints, so a
resumed run draws what the uninterrupted run drew. Before and after training the student samples
the first `causal_init.eval_pairs` pairs through its KV caches (all its steps per chunk, and the first
step alone, from the pair's initial noise) and the mean squared distances to the teacher's end points
are reported (`eval_distance_{before,after}`, `eval_first_step_{before,after}`; training pairs, so
they show how well the teacher's map is fitted). Re-noising there reuses the pair's noise instead of
fresh noise, which makes the sample a function of that noise: with fresh noise the sample follows the
re-noising draws and its distance to the teacher's end point is that of unrelated samples (about
2·Var(x0), measured) whatever the student. The first step is exactly the map the regression fits; the
later steps see re-noised inputs off the teacher's trajectories, which the regression never shows.
The final student is saved as a student folder in `<stage>/student/` (student/folder.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from distill import keys, layout
from distill.data.pairs import OdePairDataset
from distill.data.stream import DataStream
from distill.eval.probes import distance_scores
from distill.eval.run import EvalRun
from distill.logging import log_final
from distill.models import (build_student, check_student_keys, load_stage_student, load_teacher,
                            save_stage_student, student_timesteps)
from distill.trainer import TrainedModel, Trainer
from student.context import drop_text, kwargs_of
from teacher.flow import x0_from_velocity


def chunk_inputs(trajectory: torch.Tensor, timesteps: torch.Tensor, chunk: int,
                 clean: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per chunk a random level: (x_t [B, C, F, h, w], t [B, F], index [B, chunks]) from trajectory
    [B, K, C, F, h, w] at the K timesteps; with the clean end point `clean` [B, C, F, h, w] a chunk
    may also draw level K, t = 0, whose input is the clean latent."""
    batch, k, _, frames = trajectory.shape[:4]
    if frames % chunk:
        raise ValueError(f"ODE pairs have {frames} target frames, not a whole number of "
                         f"{chunk}-frame chunks (student.chunk_frames)")
    if clean is not None:
        trajectory = torch.cat([trajectory, clean[:, None].to(trajectory.dtype)], dim=1)
        timesteps = torch.cat([timesteps, timesteps.new_zeros(1)])
    index = torch.randint(trajectory.shape[1], (batch, frames // chunk))  # the global RNG: checkpointed
    per_frame = index.repeat_interleave(chunk, dim=1)
    rows = torch.arange(batch)[:, None]
    x_t = trajectory[rows, per_frame, :, torch.arange(frames)[None]]  # [B, F, C, h, w]
    return x_t.permute(0, 2, 1, 3, 4), timesteps[per_frame], index


class CausalInitStage:
    """Recipe `stage: causal_init`; metrics: the trainer's, eval_distance_* and eval_first_step_*."""

    folder = "causal-init"
    produces = "student"
    reads = keys.TRAINING + keys.STUDENT_FOLDER + ("optim.student", "causal_init", "student", "model.attention"
                                                   ) + keys.CONTEXT_RULE
    sources = {"causal_init.pairs_from": ("student.denoising_steps", "student.shift") + keys.CONTEXT_RULE}

    @staticmethod
    def check(cfg: DictConfig) -> None:
        """Student keys omegaconf cannot range-check, before any compute."""
        if cfg.causal_init.eval_pairs < 0:
            raise ValueError(f"causal_init.eval_pairs must be >= 0, got {cfg.causal_init.eval_pairs}")
        if not 0.0 <= cfg.causal_init.text_dropout <= 1.0:
            raise ValueError(f"causal_init.text_dropout must be in [0, 1], got {cfg.causal_init.text_dropout}")
        check_student_keys(cfg)

    def __init__(self, cfg: DictConfig, ctx) -> None:
        self.cfg, self.ctx = cfg, ctx

    def pairs(self) -> OdePairDataset:
        """The ODE pairs of the run (`causal_init.pairs_from`), checked against the student's timesteps."""
        folder = self.ctx.input("causal_init.pairs_from", self.cfg.causal_init.pairs_from, "ode_pairs")
        dataset = OdePairDataset(folder)
        want = student_timesteps(self.cfg)
        if len(want) != len(dataset.timesteps) or any(abs(a - b) > 1e-6 for a, b in zip(want, dataset.timesteps)):
            raise ValueError(f"{Path(folder) / 'index.json'}: pairs kept timesteps {dataset.timesteps}, but the "
                             f"student denoises at {want} (student.denoising_steps, student.shift)")
        return dataset

    def run(self) -> dict[str, float]:
        cfg, env = self.cfg, self.ctx.env
        dataset = self.pairs()
        self.timesteps = torch.tensor(dataset.timesteps, dtype=torch.float32)
        teacher = load_teacher(self.ctx.input("causal_init.teacher_from", cfg.causal_init.teacher_from, "teacher"))
        student = build_student(cfg, teacher)
        scores, probe = {}, EvalRun.of(env, cfg.run.seed)
        if cfg.causal_init.eval_pairs:
            scores.update(distance_scores(student.to(env.device), dataset, cfg.causal_init.eval_pairs, probe,
                                          "before"))
        data = DataStream(dataset, cfg.train.micro_batch, cfg.run.seed, env.rank, env.world_size)
        self.trainer = Trainer(cfg, self.ctx, [TrainedModel("student", student)], data, self.step)
        metrics = self.trainer.fit()
        engine = self.trainer.engines["student"]
        folder = layout.product(self.ctx.stage_dir, self.produces)
        save_stage_student(engine, engine.module, folder, cfg, env)
        if cfg.causal_init.eval_pairs:  # the saved student: a plain module on every rank, ZeRO-3 or not
            scores.update(distance_scores(load_stage_student(folder, cfg, env), dataset,
                                          cfg.causal_init.eval_pairs, probe, "after"))
        if scores:
            log_final(self.ctx, cfg, scores)
        return {**metrics, **scores}

    def step(self, batch: dict, due: frozenset, step: int) -> dict[str, torch.Tensor]:
        """x0-regression loss of one micro-batch (every chunk at its own level; clean chunks carry none)."""
        engine = self.trainer.engines["student"]
        device = self.ctx.env.device
        dtype = next(engine.module.parameters()).dtype
        clean = batch["x0"] if self.cfg.causal_init.clean_level else None
        x_t, t, _ = chunk_inputs(batch["trajectory"], self.timesteps, self.cfg.student.chunk_frames, clean)
        x_t, t = x_t.to(device), t.to(device)
        context = batch["context"].nonempty and batch["context"].to(device, dtype)
        text, context, _ = drop_text(batch["text"].to(device, dtype), context, self.cfg.causal_init.text_dropout)
        v = engine(x_t.to(dtype), t, text, **kwargs_of(context))
        x0 = x0_from_velocity(x_t, v.float(), t)
        noisy = (t > 0).float()[:, None, :, None, None]  # [B, 1, F, 1, 1]: the frames that carry loss
        error = (x0 - batch["x0"].to(device)).pow(2) * noisy
        return {"student": error.sum() / (noisy.expand_as(error).sum().clamp(min=1))}
