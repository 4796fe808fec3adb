"""The two Self Forcing DMD stages (ShotStream §4.2, §9): `dmd_intra` (stage 1) and `dmd_inter` (stage 2).

Three models: the generator (the causal student, started from the student folder of the stage
`dmd.generator_from`, trained through `SelfForcingGenerator` so its forward is the rollout), the critic / fake
score (a bidirectional teacher started from the teacher of the stage `dmd.teacher_from`, trained) and the real score
(the same teacher, frozen: a plain module, or ZeRO-3 partitioned with `deepspeed.frozen_zero3`).
Our step counts critic steps: the critic updates every step, the generator every
`dmd.generator_every` steps (ShotStream 1:5). Per step one exit step is drawn on rank 0 and
broadcast; the rollout runs with gradient only on generator steps.

- dmd_intra: each micro-batch is a (ground-truth history, target shot) sample; the global cache is
  built from the ground-truth context frames and the target shot is rolled out chunk by chunk.
- dmd_inter: each micro-batch is a caption-only prompt of `dmd.shots` shots; shot 1 from scratch,
  every later shot conditioned only on generated history (global cache rebuilt at each boundary
  from re-encoded generated frames, `dmd.context_from`; local cache reset). DMD on every shot.
  With `lora.rank` > 0 only peft LoRA adapters of the generator and critic train.

The real score and critic see the generator's context, or with `dmd.score_context: ground_truth`
the record's ground-truth history (dmd_inter). With `data.context.noise.shot` the critic's own
flow-matching loss sees that context noised, each frame at its drawn timestep (FilmWeaver's
asymmetric noise, distill/context_noise.py); as a score in the generator's loss it sees the clean
context the real score sees, so that the two scores compare like for like. With
`data.context.negative.p` dmd_intra's ground-truth histories may hold an irrelevant shot of
another record (distill/data/negatives.py). The final generator (its EMA when `dmd.ema_decay` >
0) is saved as a student folder in `<stage>/student/` with LoRA merged. Before and after training the student's
multi-shot rollouts (and the teacher's, once) are scored for identity colour consistency.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from distill import keys, layout
from distill.context_noise import check_range, noise_context
from distill.data.components import build_codec, negative_text, prepared_dir, prompt_stream, shot_stream
from distill.data.datasets import PreparedData, PromptDataset
from student.memory import MemoryRule
from distill.data.negatives import check_negative
from distill.data.references import check_references
from distill.dmd import critic_loss, draw_timesteps, generator_loss
from distill.ema import EMA
from distill.logging import log_final
from distill.models import load_stage_student, load_teacher, save_stage_student
from distill.eval.media import MediaLog
from distill.rollout import SelfForcingGenerator, context_function, draw_exit_step
from distill.rollout import shots as rollout_shots
from distill.trainer import TrainedModel, Trainer, place_frozen
from student.context import Context, denoisers
from student.model import CausalStudent
from teacher.encoders import pixels_to_uint8


def add_lora(transformer: torch.nn.Module, lora: DictConfig) -> None:
    """peft LoRA adapters on `lora.targets` (diffusers' add_adapter, so export can fuse them); only
    the adapters stay trainable."""
    from peft import LoraConfig

    transformer.add_adapter(LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.targets),
                                       init_lora_weights=True))


def only_lora_trainable(module: torch.nn.Module) -> list[str]:
    """Freeze everything but LoRA parameters; return the trainable names."""
    names = []
    for name, param in module.named_parameters():
        param.requires_grad_("lora_" in name)
        if param.requires_grad:
            names.append(name)
    if not names:
        raise ValueError("lora.targets matched no module of the Wan transformer")
    return names


class DMDStage:
    """Shared by both DMD stages; subclasses set `folder` and `inter`."""

    produces = "student"
    reads = keys.TRAINING + keys.STUDENT_FOLDER + ("optim.generator", "optim.critic", "dmd", "lora", "sampler",
                                                   "data.prepared", "data.context", "model.attention")
    # the generator starts from a finished student folder: what that was built with is what this stage runs with
    sources = {"dmd.generator_from": ("student",) + keys.CONTEXT_RULE}
    inter = False

    @staticmethod
    def check(cfg: DictConfig) -> None:
        """DMD keys omegaconf cannot range-check, before any compute."""
        d = cfg.dmd
        if d.generator_every < 1 or d.shots < 1 or d.sample_every < 0 or d.eval_videos < 0:
            raise ValueError("dmd.generator_every and dmd.shots must be >= 1, dmd.sample_every and "
                             "dmd.eval_videos >= 0")
        if not 0 <= d.min_t <= d.max_t <= 1000 or d.timestep_shift <= 0:
            raise ValueError(f"dmd needs 0 <= min_t <= max_t <= 1000 and timestep_shift > 0; got "
                             f"[{d.min_t}, {d.max_t}], shift {d.timestep_shift}")
        if not 0 <= d.ema_decay < 1:
            raise ValueError(f"dmd.ema_decay must be in [0, 1), got {d.ema_decay}")
        if cfg.lora.rank < 0:
            raise ValueError(f"lora.rank must be >= 0, got {cfg.lora.rank}")
        check_range(cfg.data.context.noise.shot, "data.context.noise.shot")
        check_negative(cfg.data.context.negative.p, cfg.data.context.negative.frames)
        check_references(cfg.data.context.references.p, cfg.data.context.references.max)

    def __init__(self, cfg: DictConfig, ctx) -> None:
        self.cfg, self.ctx, self.env = cfg, ctx, ctx.env
        self.dtype = self.env.dtype(cfg.deepspeed.bf16)

    # ---- models ---------------------------------------------------------------------------
    def build(self) -> tuple[SelfForcingGenerator, torch.nn.Module, torch.nn.Module]:
        """(generator, critic, real score) from the needed folders; LoRA applied when configured."""
        cfg = self.cfg
        teacher_path = self.ctx.input("dmd.teacher_from", cfg.dmd.teacher_from, "teacher")
        student = CausalStudent.from_pretrained(self.ctx.input("dmd.generator_from", cfg.dmd.generator_from, "student"),
                                                torch_dtype=torch.float32,
                                                attention_backend=cfg.model.attention).train()
        critic = load_teacher(teacher_path, cfg.model.attention).train()
        student.requires_grad_(True)
        critic.requires_grad_(True)
        if cfg.lora.rank > 0:
            for model in (student, critic):
                add_lora(model.transformer, cfg.lora)
                only_lora_trainable(model)
        student.enable_gradient_checkpointing(cfg.train.gradient_checkpointing)
        critic.enable_gradient_checkpointing(cfg.train.gradient_checkpointing)
        real = place_frozen(load_teacher(teacher_path, cfg.model.attention), cfg, self.env)
        return SelfForcingGenerator(student, lockstep=cfg.deepspeed.zero_stage == 3), critic, real

    def _geometry(self, student) -> None:
        """Latent shape of a shot and the chunks of a caption-only shot (the longest whole-chunk length a
        prepared shot may have; a dmd_intra target rolls out as many chunks as it has), from the prepared
        data and the codec."""
        data = PreparedData(prepared_dir(self.cfg))
        self.prepared = data
        self.height = self.cfg.data.height // self.codec.spatial_factor
        self.width = self.cfg.data.width // self.codec.spatial_factor
        chunk = student.settings.chunk_frames
        longest = self.codec.whole_chunks(data.shot_frames, chunk)
        if not longest:
            raise ValueError(f"shots of at most data.shot_frames={data.shot_frames} frames hold no whole "
                             f"{chunk}-frame chunk")
        self.chunks = self.codec.latent_frames(longest) // chunk
        self.student_chunk = chunk
        s = student.settings
        self.memory = MemoryRule.from_settings(s, device=self.env.device)  # None: a frame-count rule
        self.context_fn = context_function(s.context_strategy, s.context_frames, self.memory, self.codec,
                                           self.cfg.dmd.context_from == "latents")

    # ---- run ------------------------------------------------------------------------------
    def run(self) -> dict[str, float]:
        cfg, env = self.cfg, self.env
        generator, critic, self.real = self.build()
        self.codec = build_codec(cfg.codec, env.device)
        self._geometry(generator.student)
        guided = cfg.dmd.guidance != 0 or cfg.sampler.guidance_scale != 1
        self.negative = negative_text(cfg, env.device, self.dtype)[0] if guided else None
        self.media = MediaLog(self.ctx.tb_dir, Path(self.ctx.stage_dir).name, env.is_main, cfg.logging.tensorboard)
        self.exit_steps: list[int] = []
        scores = self.evaluate(generator.student.to(env.device), "before", teacher=True)
        data = prompt_stream(cfg, env.rank, env.world_size, cfg.dmd.shots) if self.inter \
            else shot_stream(cfg, env.rank, env.world_size, limit=generator.student.settings.context_frames)
        self.ema = EMA(generator, cfg.dmd.ema_decay, cfg.dmd.ema_start)
        # the generator's DMD surrogate starts at ~0 (fake score = real score) and grows by orders of
        # magnitude by design: only the critic's losses and grad norms are judged for spikes
        models = [TrainedModel("generator", generator, cfg.dmd.generator_every, after_update=self.ema.update,
                               spikes=False),
                  TrainedModel("critic", critic)]
        self.trainer = Trainer(cfg, self.ctx, models, data, self.step, extra_state={"ema": self.ema})
        try:
            metrics = self.trainer.fit()
        finally:
            self.media.close()
        engine = self.trainer.engines["generator"]
        if self.ema.enabled:
            self.ema.copy_to()  # the EMA weights are what the stage leaves
        folder = layout.product(self.ctx.stage_dir, self.produces)
        save_stage_student(engine, engine.module.student, folder, cfg, env)
        # the saved student (LoRA merged): a plain module on every rank, ZeRO-3 or not
        scores.update(self.evaluate(load_stage_student(folder, cfg, env), "after"))
        if scores:
            log_final(self.ctx, cfg, scores)
        return {**metrics, **scores}

    def evaluate(self, student, when: str, teacher: bool = False) -> dict[str, float]:
        """Multi-shot colour consistency of the student (and once of the teacher)."""
        from distill.eval.multishot import student_rollout, teacher_rollout
        from distill.eval.probes import multishot_colour
        from distill.eval.run import EvalRun

        cfg, env = self.cfg, self.env
        shots = cfg.dmd.shots  # both stages score the same multi-shot prompts, so they compare
        try:
            prompts = PromptDataset(prepared_dir(cfg), shots)
        except ValueError:
            return {}
        if cfg.dmd.eval_videos == 0 or not prompts.records[0].get("facts"):
            return {}
        count, run = cfg.dmd.eval_videos, EvalRun.of(env, cfg.run.seed)
        rollout = student_rollout(student, self.chunks, self.height, self.width, self.context_fn)
        out = {f"student_{k}_{when}": v for k, v in
               multishot_colour(rollout, prompts, count, self.codec, run, self.dtype).items()}
        if teacher:
            shape = (student.latent_channels, self.chunks * student.settings.chunk_frames, self.height, self.width)
            negative = None if cfg.sampler.guidance_scale == 1.0 else self.negative[None]
            rollout = teacher_rollout(self.real, shape, cfg.sampler, negative, self.context_fn)
            out.update({f"teacher_{k}": v for k, v in
                        multishot_colour(rollout, prompts, count, self.codec, run, self.dtype).items()})
        return out

    # ---- one step ---------------------------------------------------------------------------
    def _prompts(self, batch: dict) -> tuple[list[torch.Tensor], Context | None]:
        """The shots' texts [B, L, D] and the first shot's context (ground truth in dmd_intra)."""
        device = self.env.device
        if self.inter:
            return list(batch["texts"].to(device).unbind(1)), None
        context = batch["context"].nonempty
        return [batch["text"].to(device)], context and context.to(device)

    def _ground_truth_context(self, batch: dict, shot: int) -> Context | None:
        """The records' ground-truth history before `shot` (dmd_inter), picked by the student's rule."""
        data, s = self.prepared, self.trainer.engines["generator"].module.student.settings
        by_id = {r["id"]: r for r in data.records}
        picked = [data.history(by_id[i], shot, s.context_strategy, s.context_frames, self.memory)
                  for i in batch["record"]]
        return None if picked[0] is None else Context.stack(picked)

    def _score_context(self, shot, batch: dict, k: int) -> Context | None:
        """The history the real score and the critic see for shot k."""
        context = shot.context
        if self.inter and k > 0 and self.cfg.dmd.score_context == "ground_truth":
            context = self._ground_truth_context(batch, k)
        return context and context.to(self.env.device, self.dtype)

    def step(self, batch: dict, due: frozenset, step: int) -> dict[str, torch.Tensor]:
        """Rollout, then the critic's loss (every step) and the generator's DMD loss (when due)."""
        cfg, dmd, device = self.cfg, self.cfg.dmd, self.env.device
        gen_engine, critic = self.trainer.engines["generator"], self.trainer.engines["critic"]
        exit_step = draw_exit_step(cfg.run.seed, step, len(gen_engine.module.student.settings.denoising_steps))
        texts, first = self._prompts(batch)
        with torch.set_grad_enabled("generator" in due):
            chunks = self.chunks if self.inter else batch["latents"].shape[2] // self.student_chunk
            shots = rollout_shots(gen_engine(texts, chunks, exit_step, self.height, self.width,
                                             first_context=first, context_fn=self.context_fn,
                                             captions=batch.get("captions")))
        timesteps = lambda b: draw_timesteps(b, dmd.timestep_shift, dmd.min_t, dmd.max_t, device=device)  # noqa: E731
        gen_losses, norms, critic_losses = [], [], []
        for k, shot in enumerate(shots):
            context, text = self._score_context(shot, batch, k), shot.text.to(self.dtype)
            real_cond, real_uncond = denoisers(self.real, context, cfg.sampler.negative_scope)
            fake_cond, _ = denoisers(critic, context, cfg.sampler.negative_scope)
            real = lambda x_t, t: real_cond(x_t.to(self.dtype), t, text)  # noqa: E731
            fake = lambda x_t, t: fake_cond(x_t.to(self.dtype), t, text)  # noqa: E731
            uncond = None
            if dmd.guidance != 0:
                neg = self.negative.expand(text.shape[0], -1, -1)
                uncond = lambda x_t, t: real_uncond(x_t.to(self.dtype), t, neg)  # noqa: E731
            if "generator" in due:
                g = generator_loss(shot.x, real, fake, timesteps(text.shape[0]), torch.randn_like(shot.x),
                                   uncond, dmd.guidance)
                gen_losses.append(g.loss)
                norms.append(g.grad_norm)
            critic_losses.append(critic_loss(self._critic_score(critic, context, text), shot.x,
                                             timesteps(text.shape[0]), torch.randn_like(shot.x)))
        out = {"critic": torch.stack(critic_losses).mean(), "exit_step": torch.tensor(float(exit_step))}
        if gen_losses:
            out["generator"] = torch.stack(gen_losses).mean()
            out["dmd_grad_norm"] = torch.stack(norms).mean()
        self._media(step, exit_step, shots)
        return out

    def _critic_score(self, critic, context: Context | None, text: torch.Tensor):
        """The critic as its own flow-matching loss sees it: the context noised per
        `data.context.noise.shot` (unchanged when off)."""
        noisy = noise_context(context, self.cfg.data.context.noise.shot)
        cond, _ = denoisers(critic, noisy, self.cfg.sampler.negative_scope)
        return lambda x_t, t: cond(x_t.to(self.dtype), t, text)

    def _media(self, step: int, exit_step: int, shots) -> None:
        """Exit-step histogram every logging window; a GIF of the first row every dmd.sample_every."""
        self.exit_steps.append(exit_step)
        logged = step + 1  # the trainer logs step k after k updates
        if logged % self.cfg.logging.every == 0:
            steps = len(self.trainer.engines["generator"].module.student.settings.denoising_steps)
            # not "exit_step": that is the step's scalar, and one tag of two kinds breaks TensorBoard's HParams tab
            self.media.histogram(logged, "exit_steps", torch.tensor(self.exit_steps), steps)
            self.exit_steps = []
        every = self.cfg.dmd.sample_every
        if every and logged % every == 0 and self.env.is_main:
            latents = torch.cat([s.x[:1].detach().float() for s in shots], dim=2)
            frames = pixels_to_uint8(self.codec.decode(latents)[0].cpu())
            self.media.gif(logged, "rollout", frames, self.cfg.data.fps)


class DMDIntraStage(DMDStage):
    """Recipe `stage: dmd_intra` (stage 1, intra-shot Self Forcing)."""

    folder = "dmd-intra"
    inter = False


class DMDInterStage(DMDStage):
    """Recipe `stage: dmd_inter` (stage 2, inter-shot Self Forcing on generated history)."""

    folder = "dmd-inter"
    inter = True
    # caption-only prompts: no ground-truth history to mix negatives into
    reads = tuple(r for r in DMDStage.reads if r != "data.context") + keys.CONTEXT_RULE + ("data.context.noise",)
