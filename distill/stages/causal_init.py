"""The `causal_init` stage: the causal student regresses the teacher's ODE pairs (CausVid; ShotStream §9).

The student starts as the teacher (`CausalStudent.from_teacher`: same weights, chunk-causal
attention) with every parameter trainable. For each pair of a micro-batch every chunk of
`student.chunk_frames` target frames draws its own index k into the K stored timesteps (different
noise levels per chunk); the input is, per chunk, the stored trajectory latent at k, and each frame's
timestep the k-th student timestep. One full-sequence chunk-causal forward with the history as a clean
prefix at t = 0 predicts v; the loss is the MSE between x0 = x_t − σ·v and the pair's clean end point
over every target frame (all of them are noisy: the student's timesteps are > 0).

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
The final student is exported to `<stage>/student/` (student/export.py).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from distill.data.stream import DataStream
from distill.stages.ode_pairs import OdePairDataset, OdePairsStage, student_timesteps, teacher_dir
from distill.trainer import TrainedModel, Trainer
from student.context import Context, kwargs_of
from student.model import CausalStudent
from teacher.flow import sigma, x0_from_velocity

STUDENT_DIR = "student"


def build_student(cfg: DictConfig, teacher) -> CausalStudent:
    """The recipe's student around the teacher's transformer (shared, not copied), all parameters trainable."""
    s = cfg.student
    student = CausalStudent.from_teacher(
        teacher, chunk_frames=s.chunk_frames, copy=False,
        indicator=None if s.indicator == "auto" else s.indicator, local_chunks=s.local_chunks,
        context_frames=cfg.data.context.budget, context_strategy=cfg.data.context.strategy,
        denoising_steps=list(s.denoising_steps), shift=s.shift)
    student.requires_grad_(True)
    student.enable_gradient_checkpointing(cfg.train.gradient_checkpointing)
    return student


def gathered(engine):
    """Full parameters of an engine's module inside the block (ZeRO-3 gathers them on every rank)."""
    if engine.zero_optimization_stage() != 3:
        return nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)


def stage_components(cfg: DictConfig) -> dict[str, dict]:
    """The recipe's codec and text encoder, described for a stage's student export. Their `path` is
    kept as `source`: export_student would copy a `path` folder (a whole Wan root here), while
    `shotdistill export` rebuilds the serving components from the stage's config.yaml anyway."""
    described = {}
    for name in ("codec", "text_encoder"):
        entry = OmegaConf.to_container(cfg[name], resolve=True)
        entry["source"] = entry.pop("path")
        described[name] = entry
    return described


def save_student(engine, folder: Path, cfg: DictConfig, env) -> None:
    """Rank 0 exports the trained student (transformer, settings, described components)."""
    from distill.distributed import barrier
    from student.export import export_student

    components = stage_components(cfg)
    with gathered(engine):
        if env.is_main:
            export_student(engine.module, folder, components)
    barrier()


def chunk_inputs(trajectory: torch.Tensor, timesteps: torch.Tensor,
                 chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per chunk a random trajectory index: (x_t [B, C, F, h, w], t [B, F], index [B, chunks]) from
    trajectory [B, K, C, F, h, w] and the K timesteps."""
    batch, k, _, frames = trajectory.shape[:4]
    if frames % chunk:
        raise ValueError(f"ODE pairs have {frames} target frames, not a whole number of "
                         f"{chunk}-frame chunks (student.chunk_frames)")
    index = torch.randint(k, (batch, frames // chunk))  # the global RNG: checkpointed
    per_frame = index.repeat_interleave(chunk, dim=1)
    rows = torch.arange(batch)[:, None]
    x_t = trajectory[rows, per_frame, :, torch.arange(frames)[None]]  # [B, F, C, h, w]
    return x_t.permute(0, 2, 1, 3, 4), timesteps[per_frame], index


@torch.no_grad()
def student_sample(student: CausalStudent, item: dict, device, steps: int | None = None) -> torch.Tensor:
    """The student's cached sample [1, C, F, h, w] of one ODE pair, chunk by chunk as at inference
    with the first `steps` (default: all) denoising steps, except that every re-noising reuses the
    pair's initial noise instead of fresh noise: the sample is then a function of that noise,
    comparable with the teacher's end point from it. The t = 0 pass caches each finished chunk."""
    from student.sampling import ChunkStream

    dtype = next(student.parameters()).dtype
    _, frames, height, width = item["x0"].shape
    chunk = student.settings.chunk_frames
    stream = ChunkStream(student, 1, height, width, device=device, dtype=dtype)
    context = item["context"].nonempty and Context.stack([item["context"]]).to(device, dtype)
    stream.begin_shot(item["text"][None].to(device, dtype), context)
    times = stream.timesteps[:steps]
    levels = [float(sigma(torch.tensor(t))) for t in times]
    out = []
    for c in range(0, frames, chunk):
        noise = item["noise"][None, :, c:c + chunk].to(device)
        x = noise
        for k, t in enumerate(times):
            x0 = x - levels[k] * stream.predict(x.to(dtype), torch.full((1,), t, device=device)).float()
            if k + 1 < len(levels):
                x = (1 - levels[k + 1]) * x0 + levels[k + 1] * noise
        stream.commit(x0)
        out.append(x0)
    return torch.cat(out, dim=2)


def sample_distances(student: CausalStudent, dataset: OdePairDataset, count: int, env) -> tuple[float, float]:
    """Mean squared distance to the teacher's end points over the first `count` pairs of the
    student's samples with all its steps and with the first step only (x0 straight from the noise:
    exactly the map the regression fits at t = 1000); ranks split the pairs and sum."""
    from distill.distributed import all_sum

    pairs = list(range(min(count, len(dataset))))
    totals = torch.zeros(3, dtype=torch.float64)
    for n in pairs[env.rank::env.world_size]:
        item = dataset[n]
        target = item["x0"][None]
        full, first = (student_sample(student, item, env.device, steps) for steps in (None, 1))
        totals += torch.tensor([float((full.float().cpu() - target).pow(2).mean()),
                                float((first.float().cpu() - target).pow(2).mean()), 1.0], dtype=torch.float64)
    totals = all_sum(totals.to(env.device)).cpu()
    return float(totals[0] / totals[2]), float(totals[1] / totals[2])


def distance_scores(student: CausalStudent, dataset: OdePairDataset, count: int, env, when: str) -> dict:
    """`sample_distances` as the stage's metrics, suffixed `when` (before / after)."""
    full, first = sample_distances(student, dataset, count, env)
    return {f"eval_distance_{when}": full, f"eval_first_step_{when}": first}


class CausalInitStage:
    """Recipe `stage: causal_init`; metrics: the trainer's, eval_distance_* and eval_first_step_*."""

    folder = "causal-init"

    @staticmethod
    def check(cfg: DictConfig) -> None:
        """Student keys omegaconf cannot range-check, before any compute."""
        if cfg.causal_init.eval_pairs < 0:
            raise ValueError(f"causal_init.eval_pairs must be >= 0, got {cfg.causal_init.eval_pairs}")
        OdePairsStage.check(cfg)  # the student keys

    def __init__(self, cfg: DictConfig, ctx) -> None:
        self.cfg, self.ctx = cfg, ctx

    def pairs(self) -> OdePairDataset:
        """The ODE pairs of the run, checked against the student's timesteps."""
        folder = self.ctx.needs.get(OdePairsStage.folder)
        if folder is None:
            raise ValueError(f"{self.ctx.recipe}: causal_init reads ODE pairs: add the ode-pairs recipe to `needs:`")
        dataset = OdePairDataset(folder)
        want = student_timesteps(self.cfg)
        if len(want) != len(dataset.timesteps) or any(abs(a - b) > 1e-6 for a, b in zip(want, dataset.timesteps)):
            raise ValueError(f"{Path(folder) / 'index.json'}: pairs kept timesteps {dataset.timesteps}, but the "
                             f"student denoises at {want} (student.denoising_steps, student.shift)")
        return dataset

    def run(self) -> dict[str, float]:
        from distill.models import load_teacher

        cfg, env = self.cfg, self.ctx.env
        dataset = self.pairs()
        self.timesteps = torch.tensor(dataset.timesteps, dtype=torch.float32)
        student = build_student(cfg, load_teacher(teacher_dir(self.ctx)))
        scores = {}
        if cfg.causal_init.eval_pairs:
            scores.update(distance_scores(student.to(env.device), dataset, cfg.causal_init.eval_pairs, env,
                                          "before"))
        data = DataStream(dataset, cfg.train.micro_batch, cfg.run.seed, env.rank, env.world_size)
        self.trainer = Trainer(cfg, self.ctx, [TrainedModel("student", student)], data, self.step)
        metrics = self.trainer.fit()
        engine = self.trainer.engines["student"]
        if cfg.causal_init.eval_pairs:
            with gathered(engine):
                scores.update(distance_scores(engine.module, dataset, cfg.causal_init.eval_pairs, env, "after"))
        save_student(engine, Path(self.ctx.stage_dir) / STUDENT_DIR, cfg, env)
        if scores:
            from distill.stages.teacher import log_final
            log_final(self.ctx, cfg, scores)
        return {**metrics, **scores}

    def step(self, batch: dict, due: frozenset, step: int) -> dict[str, torch.Tensor]:
        """x0-regression loss of one micro-batch (every chunk at its own trajectory index)."""
        engine = self.trainer.engines["student"]
        device = self.ctx.env.device
        dtype = next(engine.module.parameters()).dtype
        x_t, t, _ = chunk_inputs(batch["trajectory"], self.timesteps, self.cfg.student.chunk_frames)
        x_t, t = x_t.to(device), t.to(device)
        context = kwargs_of(batch["context"].nonempty and batch["context"].to(device, dtype))
        v = engine(x_t.to(dtype), t, batch["text"].to(device, dtype), **context)
        x0 = x0_from_velocity(x_t, v.float(), t)
        return {"student": (x0 - batch["x0"].to(device)).pow(2).mean()}
