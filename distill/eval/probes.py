"""The probes stages run while training: small, fixed evaluations logged as the stage's metrics.

- `next_shot_colour` (teacher stage): does the teacher keep the context's characters? For a few
  prepared (history, next shot) samples whose records carry facts, the same initial noise is denoised
  twice with the recipe's sampler: once conditioned on the context frames, once on the captions
  alone. Both results are decoded with the recipe's codec and scored with
  `distill.eval.metrics.colour_consistency` against the facts of the target shot.
- `multishot_colour` (DMD stages): multi-shot rollouts (distill/eval/multishot.py) of the student
  or the teacher, every shot after the first conditioned only on the model's own earlier shots, each
  decoded shot scored against the facts of that shot; `colour_all` averages every shot,
  `colour_later` only shots 2.. (the ones that depend on generated history). Noise is seeded per
  prompt, so before/after numbers compare the same draws.
- `distance_scores` (causal-init stage): the student's cached samples of ODE pairs (`student_sample`)
  against the teacher's end points, with all its steps and with the first step only.

Every probe splits its items over ranks with the one padded split (`EvalRun.share`,
distill/eval/split.py) and sums its scores over ranks: each rank runs the same number of forwards,
since under ZeRO-3 each forward gathers parameters collectively and a rank that skipped one would
leave the others waiting.
"""

from __future__ import annotations

from typing import Sequence

import torch
from omegaconf import DictConfig

from distill.data.components import build_codec, memory_rule, prepared_dir
from distill.data.datasets import PromptDataset, ShotDataset
from distill.eval.metrics import colour_consistency
from distill.eval.multishot import Rollout, guided_negative
from distill.eval.run import EvalRun
from distill.seeds import derive_seed
from student.context import Context, denoisers
from student.model import CausalStudent
from teacher.encoders import Codec, pixels_to_uint8
from teacher.sampler import draw_noise, sample


def eval_items(dataset: ShotDataset, count: int) -> list[int]:
    """`count` items with a history and facts, spread evenly over the dataset (deterministic)."""
    usable = [i for i, (r, target) in enumerate(dataset.items)
              if target > 0 and dataset.data.records[r].get("facts")]
    if count >= len(usable):
        return usable
    return [usable[(k * len(usable)) // count] for k in range(count)]


def _shot(model, item: dict, noise: torch.Tensor, negative, cfg: DictConfig, with_context: bool,
          device, dtype) -> torch.Tensor:
    """Clean latents [1, C, F, h, w] of one sampled next shot."""
    context = Context.stack([item["context"]]).to(device, dtype) if with_context else None
    text = item["text"][None].to(device, dtype)
    s = cfg.sampler
    cond, uncond = denoisers(model, context, s.negative_scope)
    return sample(cond, text, noise, negative_text=negative, negative_denoiser=uncond,
                  guidance_scale=s.guidance_scale, steps=s.steps, shift=s.shift).x0


@torch.no_grad()
def next_shot_colour(model, cfg: DictConfig, run: EvalRun) -> dict[str, float]:
    """{eval_colour_with_context, eval_colour_without_context}, averaged over `teacher.eval_samples`
    next shots; {} when none is asked for or no prepared record carries facts."""
    from distill.distributed import all_sum

    if cfg.teacher.eval_samples == 0:
        return {}
    dataset = ShotDataset(prepared_dir(cfg), cfg.data.context.strategy, cfg.data.context.budget,
                          memory=memory_rule(cfg))
    items = eval_items(dataset, cfg.teacher.eval_samples)
    if not items:
        return {}
    device = run.device
    dtype = next(model.parameters()).dtype
    codec = build_codec(cfg.codec, device)
    negative = guided_negative(cfg, device, dtype)
    totals = torch.zeros(3, dtype=torch.float64)
    for n, weight in run.share(len(items)):
        k = items[n]
        item = dataset[k]
        record = dataset.data.records[dataset.items[k][0]]
        gen = torch.Generator().manual_seed(derive_seed(run.seed, "next-shot-probe", k))
        noise = draw_noise((1, *item["latents"].shape), gen, dtype, device)
        for slot, with_context in ((0, True), (1, False)):
            latents = _shot(model, item, noise, negative, cfg, with_context, device, dtype)
            frames = pixels_to_uint8(codec.decode(latents.float())[0].cpu())
            totals[slot] += weight * colour_consistency(frames, record["facts"], int(item["target_shot"]))
        totals[2] += weight
    totals = all_sum(totals.to(device)).cpu()
    return {"eval_colour_with_context": float(totals[0] / totals[2]),
            "eval_colour_without_context": float(totals[1] / totals[2])}


@torch.no_grad()
def multishot_colour(rollout: Rollout, prompts: PromptDataset, count: int, codec: Codec, run: EvalRun,
                     dtype: torch.dtype) -> dict[str, float]:
    """{colour_all, colour_later} over the first `count` prompts (every rank runs its share)."""
    from distill.distributed import all_sum

    totals = torch.zeros(4, dtype=torch.float64)
    for i, weight in run.share(min(count, len(prompts))):
        item = prompts[i]
        texts = [t[None].to(run.device, dtype) for t in item["texts"]]
        shots = rollout(texts, torch.Generator().manual_seed(derive_seed(run.seed, "multishot-probe", i)),
                        [item["captions"]])
        for k, latents in enumerate(shots):
            frames = pixels_to_uint8(codec.decode(latents.float())[0].cpu())
            score = colour_consistency(frames, item["facts"], k)
            totals += weight * torch.tensor([score, 1.0, score if k else 0.0, float(k > 0)], dtype=torch.float64)
    totals = all_sum(totals.to(run.device)).cpu()
    return {"colour_all": float(totals[0] / totals[1].clamp(min=1)),
            "colour_later": float(totals[2] / totals[3].clamp(min=1))}


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
    exit_step = None if steps is None else steps - 1
    out = []
    for c in range(0, frames, chunk):
        noise = item["noise"][None, :, c:c + chunk].to(device)
        out.append(stream.next_chunk(noise=noise, exit_step=exit_step, renoise=noise))
    return torch.cat(out, dim=2)


def sample_distances(student: CausalStudent, pairs: Sequence[dict], count: int, run: EvalRun) -> tuple[float, float]:
    """Mean squared distance to the teacher's end points over the first `count` ODE pairs (items of
    an OdePairDataset) of the student's samples with all its steps and with the first step only (x0
    straight from the noise: exactly the map the regression fits at t = 1000); ranks split the pairs
    and sum."""
    from distill.distributed import all_sum

    totals = torch.zeros(3, dtype=torch.float64)
    for n, weight in run.share(min(count, len(pairs))):
        item = pairs[n]
        target = item["x0"][None]
        full, first = (student_sample(student, item, run.device, steps) for steps in (None, 1))
        totals += weight * torch.tensor([float((full.float().cpu() - target).pow(2).mean()),
                                         float((first.float().cpu() - target).pow(2).mean()), 1.0],
                                        dtype=torch.float64)
    totals = all_sum(totals.to(run.device)).cpu()
    return float(totals[0] / totals[2]), float(totals[1] / totals[2])


def distance_scores(student: CausalStudent, pairs: Sequence[dict], count: int, run: EvalRun, when: str) -> dict:
    """`sample_distances` as the causal-init stage's metrics, suffixed `when` (before / after)."""
    full, first = sample_distances(student, pairs, count, run)
    return {f"eval_distance_{when}": full, f"eval_first_step_{when}": first}
