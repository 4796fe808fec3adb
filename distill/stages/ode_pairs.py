"""The `ode_pairs` stage: teacher ODE trajectories kept at the student's timesteps (CausVid protocol).

Pair i is a pure function of (run.seed, i): the next-shot sample is item i mod N of the prepared
`ShotDataset` (its history context and the target shot's caption; with `data.context.negative.p` the
history may also hold an irrelevant shot of another record, drawn as the teacher's training draws it
in epoch i div N, so the causal init learns from the teacher to ignore it), the initial noise comes from a
generator seeded by `derive_seed(seed, "ode-noise", i)`. The teacher's Euler sampler (`ode.steps`, `ode.shift`,
ordinary CFG `ode.guidance_scale` against `sampler.negative_prompt`) runs with the student's
denoising timesteps (`student.denoising_steps` warped by `student.shift`) inserted as nodes, so the
kept latents lie exactly on the trajectory.

Shard k holds pairs [k·P, (k+1)·P) (P = `ode.pairs_per_shard`) and belongs to rank k mod world, so
the pairs written do not depend on the number of ranks. Per slot n of a shard:

    n/noise        [C, F, h, w]     the initial noise (= the trajectory at t = 1000)
    n/trajectory   [K, C, F, h, w]  the latents at the K student timesteps (index.json: timesteps)
    n/x0           [C, F, h, w]     the clean end point
    n/text         [L, D]           the target shot's text (global ⊕ shot caption)
    n/context      [C, Fc, h, w]    clean history frames (Fc = 0 for a first shot)
    n/context_shot [Fc]             history shot of each context frame
    n/shot_texts   [S, L, D]        the text of each distinct history shot in `context_shot` (sorted),
                                    stored once per shot instead of once per context frame

The sidecar `shard-NNNNN.json` (the settings fingerprint and each pair's record id, target shot and
dataset item) is written after the tensors and commits the shard: a rerun skips committed shards and
refuses shards made with other settings. Rank 0 merges the sidecars into `index.json` at the end.
`distill.data.pairs.OdePairDataset` reads the folder back as training samples for the causal init.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig

from distill.data.components import memory_rule, negative_text, prepared_dir
from distill.data.negatives import check_negative
from distill.data.datasets import ShotDataset
from distill import keys, layout
from distill.data.shards import INDEX, read_json, shard_name, shard_problem, write_json, write_shard
from distill.models import check_student_keys, student_timesteps
from distill.seeds import derive_seed
from student.context import Context, denoisers
from teacher.sampler import draw_noise, sample

STORE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FORMAT = 2  # 2: pairs of many lengths (index records each target's latent frames)


def pair_noise(seed: int, i: int, shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Pair i's initial noise [1, *shape], drawn on the CPU so that it is the same on every device."""
    return draw_noise((1, *shape), torch.Generator().manual_seed(derive_seed(seed, "ode-noise", i)), dtype, device)


def teacher_fingerprint(model_dir: Path) -> str:
    """Identifies the trained teacher: a hash of its stage's DONE record (unique per teacher run) and config."""
    parts = [model_dir.parent / layout.DONE, model_dir / "config.json"]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: the teacher stage has not finished")
    return hashlib.sha256(b"".join(p.read_bytes() for p in parts)).hexdigest()[:16]


def sample_pair(teacher, item: dict, noise: torch.Tensor, negative: torch.Tensor | None,
                ode: DictConfig, keep: list[float], negative_scope: str):
    """The teacher's sampler on one dataset item from `noise` [1, C, F, h, w] (its dtype is the
    model's); returns the sampler's `SampleResult` (x0 [1, ...], trajectory [K, 1, ...])."""
    device, dtype = noise.device, noise.dtype
    context = item["context"].nonempty
    cond, uncond = denoisers(teacher, context and Context.stack([context]).to(device, dtype), negative_scope)
    return sample(cond, item["text"][None].to(device, dtype), noise, negative_text=negative, negative_denoiser=uncond,
                  guidance_scale=ode.guidance_scale, steps=ode.steps, shift=ode.shift, keep_timesteps=keep)


def pair_tensors(slot: int, item: dict, noise: torch.Tensor, result, dtype: torch.dtype) -> dict:
    """A pair's shard entries (see module doc), on the CPU in the storage dtype."""
    context = item["context"]
    distinct, first = torch.unique(context.shots, return_inverse=True)
    rows = [int((first == u).nonzero()[0]) for u in range(len(distinct))]
    store = lambda x: x.detach().to("cpu", dtype).contiguous()  # noqa: E731
    return {f"{slot}/noise": store(noise[0]), f"{slot}/trajectory": store(result.trajectory[:, 0]),
            f"{slot}/x0": store(result.x0[0]), f"{slot}/text": store(item["text"]),
            f"{slot}/context": store(context.latents), f"{slot}/context_shot": context.shots.long().contiguous(),
            f"{slot}/shot_texts": store(context.texts[rows])}


class OdePairsStage:
    """Recipe `stage: ode_pairs`; metrics: pairs, shards, shards_sampled (this run)."""

    folder = "ode-pairs"
    produces = "ode_pairs"
    reads = ("deepspeed", "data.prepared", "codec", "text_encoder", "sampler.negative_prompt",
             "sampler.negative_scope", "ode", "student", "model.attention", "data.context.negative") + keys.CONTEXT_RULE

    @staticmethod
    def check(cfg: DictConfig) -> None:
        """ODE keys omegaconf cannot range-check, before any compute."""
        o = cfg.ode
        if o.pairs < 1 or o.pairs_per_shard < 1 or o.steps < 1:
            raise ValueError("ode.pairs, ode.pairs_per_shard and ode.steps must be >= 1")
        if o.shift <= 0:
            raise ValueError("ode.shift must be > 0")
        if cfg.deepspeed.frozen_zero3:
            raise ValueError("deepspeed.frozen_zero3: ode_pairs runs the teacher as a plain module "
                             "(ranks sample different shards, so they cannot share ZeRO-3 collectives)")
        check_student_keys(cfg)
        check_negative(cfg.data.context.negative.p, cfg.data.context.negative.frames)

    def __init__(self, cfg: DictConfig, ctx) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.out = Path(ctx.stage_dir)

    def fingerprint(self, model_dir: Path, dataset: ShotDataset) -> dict:
        """Everything that decides a shard's content (a committed shard must match it)."""
        o = self.cfg.ode
        return {"format": FORMAT, "seed": self.cfg.run.seed, "pairs": o.pairs, "pairs_per_shard": o.pairs_per_shard,
                "steps": o.steps, "shift": o.shift, "guidance_scale": o.guidance_scale, "dtype": o.dtype,
                "negative_prompt": self.cfg.sampler.negative_prompt if o.guidance_scale != 1.0 else None,
                "negative_scope": self.cfg.sampler.negative_scope if o.guidance_scale != 1.0 else None,
                "timesteps": student_timesteps(self.cfg), "teacher": teacher_fingerprint(model_dir),
                "items": len(dataset), "prepared": dataset.data.settings,
                **({"negative": list(dataset.negative[:2])} if dataset.negative else {}),
                "compute_dtype": str(self.ctx.env.dtype(self.cfg.deepspeed.bf16)).removeprefix("torch.")}

    def committed(self, name: str, fingerprint: dict) -> bool:
        meta = read_json(self.out / f"{name}.json")
        if meta is None:
            return False
        if meta.get("fingerprint") != fingerprint:
            changed = sorted(k for k in fingerprint if meta.get("fingerprint", {}).get(k) != fingerprint[k])
            raise ValueError(f"{self.out / name}.json was sampled with other settings ({', '.join(changed)}); "
                             f"delete {self.out} to sample again")
        problem = shard_problem(self.out, name, meta)  # truncated, replaced or deleted since
        if problem:
            print(f"{self.out / name}: {problem}; sampling the shard again", file=sys.stderr, flush=True)
        return problem is None

    def run(self) -> dict[str, float]:
        from distill.distributed import all_sum, barrier
        from distill.models import load_teacher
        from distill.trainer import place_frozen

        cfg, env = self.cfg, self.ctx.env
        model_dir = self.ctx.input("ode.teacher_from", cfg.ode.teacher_from, "teacher")
        negative = cfg.data.context.negative
        dataset = ShotDataset(prepared_dir(cfg), cfg.data.context.strategy, cfg.data.context.budget,
                              (negative.p, negative.frames, cfg.run.seed) if negative.p > 0 else None,
                              limit=cfg.data.context.budget, memory=memory_rule(cfg))  # what the student's cache holds
        fingerprint = self.fingerprint(model_dir, dataset)
        self.out.mkdir(parents=True, exist_ok=True)
        per, total = cfg.ode.pairs_per_shard, cfg.ode.pairs
        shards = (total + per - 1) // per
        mine = list(range(env.rank, shards, env.world_size))
        todo = [k for k in mine if not self.committed(shard_name(k), fingerprint)]
        if todo:
            teacher = place_frozen(load_teacher(model_dir, cfg.model.attention), cfg, env)
            self.sample_shards(teacher, dataset, todo, fingerprint)
        counts = all_sum(torch.tensor([float(len(todo))], device=env.device)).cpu()
        barrier()
        if env.is_main:
            self.write_index(shards, fingerprint)
        barrier()
        metrics = {"pairs": float(total), "shards": float(shards), "shards_sampled": float(counts[0])}
        self.log(metrics)
        return metrics

    @torch.no_grad()
    def sample_shards(self, teacher, dataset: ShotDataset, todo: list[int], fingerprint: dict) -> None:
        """Sample and write the shards `todo` (one pair at a time: bit-for-bit what `sample` gives)."""
        from tqdm import tqdm

        cfg, env = self.cfg, self.ctx.env
        per, total, keep = cfg.ode.pairs_per_shard, cfg.ode.pairs, fingerprint["timesteps"]
        dtype = next(teacher.parameters()).dtype
        negative = None if cfg.ode.guidance_scale == 1.0 else negative_text(cfg, env.device, dtype)
        store = STORE_DTYPES[cfg.ode.dtype]
        count = sum(min(per, total - k * per) for k in todo)
        with tqdm(total=count, desc="ode-pairs", unit="pair", file=sys.stderr, dynamic_ncols=True,
                  disable=not (cfg.logging.progress and env.is_main)) as bar:
            for k in todo:
                tensors, pairs = {}, []
                for slot, i in enumerate(range(k * per, min((k + 1) * per, total))):
                    j = i % len(dataset)
                    dataset.set_epoch(i // len(dataset))  # the negative draws of pass i div N over the data
                    item = dataset[j]
                    noise = pair_noise(cfg.run.seed, i, item["latents"].shape, dtype, env.device)
                    result = sample_pair(teacher, item, noise, negative, cfg.ode, keep, cfg.sampler.negative_scope)
                    tensors.update(pair_tensors(slot, item, noise, result, store))
                    pairs.append({"pair": i, "item": j, "record": item["record"],
                                  "target_shot": int(item["target_shot"]),
                                  "context_frames": item["context"].frames,
                                  "frames": int(item["latents"].shape[1])})
                    bar.update(1)
                write_shard(self.out, shard_name(k), tensors, {"fingerprint": fingerprint, "pairs": pairs})

    def write_index(self, shards: int, fingerprint: dict) -> None:
        """Merge every shard's sidecar into index.json (rank 0, after every rank finished)."""
        pairs = []
        for k in range(shards):
            name = shard_name(k)
            meta = read_json(self.out / f"{name}.json")
            if meta is None:
                raise RuntimeError(f"{self.out / name}.json is missing: a rank did not finish its shards")
            pairs += [{**p, "shard": name, "slot": n} for n, p in enumerate(meta["pairs"])]
        write_json(self.out / INDEX, {"fingerprint": fingerprint, "timesteps": fingerprint["timesteps"],
                                      "pairs": pairs})

    def log(self, metrics: dict[str, float]) -> None:
        from distill.logging import log_once

        log_once(self.ctx.tb_dir, self.out.name, 0, metrics, main=self.ctx.env.is_main,
                 enabled=self.cfg.logging.tensorboard)
