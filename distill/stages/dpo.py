"""The `dpo` stage: Diffusion-DPO preference alignment of a trained next-shot teacher (STAGE §4.2).

The policy starts as the teacher of the stage `dpo.teacher_from` and trains the parameters that teacher
trained (`teacher.trainable`, saved with it); the frozen reference is the same teacher. Each micro-batch
holds preference pairs (distill/data/preference.py): a history, its text, the true next shot (winner)
and a mismatched shot (loser, from `dpo.pairs`). Winner and loser share t ~ U[0, 1000) (shifted by
`dpo.timestep_shift`) and the noise ε, and the loss is distill/dpo.py's. Logged per step: the loss,
the implicit reward margin and accuracy (`dpo/margin`, `dpo/accuracy`) and the policy's error minus
the reference's on winners and losers (`dpo/winner_gap`, `dpo/loser_gap`). The aligned teacher is
saved to `<stage>/model/`, a teacher product: ODE pairs, causal init and DMD may name it
(`*.teacher_from: dpo`).

`stage: dpo_student` aligns a causal student the same way: the policy and the frozen reference are
the student folder of the stage `dpo.student_from` (a causal init or a DMD stage), scored by the
student's chunk-causal full-sequence forward, what the causal init trains; every parameter trains,
as in the causal init. The aligned student is saved to `<stage>/student/`, where DMD may start from
it (`dmd.generator_from: dpo-student`) and export may take it.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from distill import keys, layout
from distill.data.components import memory_rule, prepared_dir
from distill.data.preference import PreferenceDataset, check_sources
from distill.data.stream import DataStream
from distill.dpo import dpo_loss
from distill.models import load_teacher, save_stage_student, save_teacher
from distill.trainer import TrainedModel, Trainer, place_frozen
from student.context import Context, kwargs_of
from student.model import CausalStudent
from teacher.flow import NUM_TRAIN_TIMESTEPS, shift_timestep


def doubled(text: torch.Tensor, context: Context | None) -> tuple[torch.Tensor, Context | None]:
    """The conditioning of B pairs for a batch of 2B (winners, then losers): each sample's twice."""
    if context is None:
        return torch.cat([text, text]), None
    return torch.cat([text, text]), Context(torch.cat([context.latents] * 2), torch.cat([context.texts] * 2),
                                            torch.cat([context.shots] * 2))


class DPOStage:
    """Recipe `stage: dpo`; metrics: the trainer's (loss, margin, accuracy of the last window)."""

    folder = "dpo"
    produces = "teacher"
    ALIGNMENT = ("optim.dpo", "dpo.beta", "dpo.pairs", "dpo.timestep_shift", "data.prepared", "model.attention")
    reads = keys.TRAINING + ALIGNMENT + ("dpo.teacher_from",) + keys.CONTEXT_RULE
    # the pairs' histories follow the context rule the teacher was trained with
    sources = {"dpo.teacher_from": keys.CONTEXT_RULE}

    @staticmethod
    def check(cfg: DictConfig) -> None:
        """DPO keys omegaconf cannot range-check, before any compute."""
        if cfg.dpo.beta <= 0 or cfg.dpo.timestep_shift <= 0:
            raise ValueError(f"dpo.beta and dpo.timestep_shift must be > 0, got {cfg.dpo.beta}, "
                             f"{cfg.dpo.timestep_shift}")
        check_sources(cfg.dpo.pairs)

    def __init__(self, cfg: DictConfig, ctx) -> None:
        self.cfg, self.ctx = cfg, ctx

    def models(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(policy, frozen reference): the teacher of `dpo.teacher_from`, twice."""
        cfg = self.cfg
        folder = self.ctx.input("dpo.teacher_from", cfg.dpo.teacher_from, "teacher")
        policy = load_teacher(folder, cfg.model.attention).train()
        policy.set_trainable()  # what the teacher trained (its saved `trainable`)
        return policy, load_teacher(folder, cfg.model.attention)

    def save(self, engine) -> None:
        save_teacher(engine, layout.product(self.ctx.stage_dir, self.produces), self.ctx.env)

    def run(self) -> dict[str, float]:
        cfg, env = self.cfg, self.ctx.env
        policy, reference = self.models()
        policy.enable_gradient_checkpointing(cfg.train.gradient_checkpointing)
        self.reference = place_frozen(reference, cfg, env)
        pairs = PreferenceDataset(prepared_dir(cfg), cfg.data.context.strategy, cfg.data.context.budget,
                                  cfg.dpo.pairs, cfg.run.seed, memory_rule(cfg))
        data = DataStream(pairs, cfg.train.micro_batch, cfg.run.seed, env.rank, env.world_size)
        self.trainer = Trainer(cfg, self.ctx, [TrainedModel("dpo", policy)], data, self.step)
        metrics = self.trainer.fit()
        self.save(self.trainer.engines["dpo"])
        return metrics

    def step(self, batch: dict, due: frozenset, step: int) -> dict[str, torch.Tensor]:
        """The DPO loss of one micro-batch of pairs, its implicit margin and accuracy."""
        engine, device = self.trainer.engines["dpo"], self.ctx.env.device
        dtype = next(engine.module.parameters()).dtype
        winner = batch["latents"].to(device, torch.float32)
        loser = batch["loser"].to(device, torch.float32)
        u = torch.rand(winner.shape[0], dtype=torch.float64) * NUM_TRAIN_TIMESTEPS
        t = shift_timestep(u, self.cfg.dpo.timestep_shift).to(device, torch.float32)
        noise = torch.randn_like(winner)
        context = batch["context"].nonempty
        text, context = doubled(batch["text"].to(device, dtype), context and context.to(device, dtype))
        conditioning = kwargs_of(context)
        policy = lambda x_t, tt: engine(x_t.to(dtype), tt, text, **conditioning)  # noqa: E731
        reference = lambda x_t, tt: self.reference(x_t.to(dtype), tt, text, **conditioning)  # noqa: E731
        out = dpo_loss(policy, reference, winner, loser, t, noise, self.cfg.dpo.beta)
        return {"dpo": out.loss, "margin": out.margin, "accuracy": out.accuracy, "winner_gap": out.winner_gap,
                "loser_gap": out.loser_gap}


class StudentDPOStage(DPOStage):
    """Recipe `stage: dpo_student` (module doc); metrics as `dpo`'s."""

    folder = "dpo-student"
    produces = "student"
    reads = keys.TRAINING + keys.STUDENT_FOLDER + DPOStage.ALIGNMENT + ("dpo.student_from", "student") + \
        keys.CONTEXT_RULE
    # what the student was built with is what it is aligned (and saved) with
    sources = {"dpo.student_from": ("student",) + keys.CONTEXT_RULE}

    def models(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(policy, frozen reference): the student of `dpo.student_from`, twice, in float32."""
        cfg = self.cfg
        folder = self.ctx.input("dpo.student_from", cfg.dpo.student_from, "student")
        load = lambda: CausalStudent.from_pretrained(folder, torch_dtype=torch.float32,  # noqa: E731
                                                     attention_backend=cfg.model.attention)
        return load().train().requires_grad_(True), load()

    def save(self, engine) -> None:
        save_stage_student(engine, engine.module, layout.product(self.ctx.stage_dir, self.produces), self.cfg,
                           self.ctx.env)
