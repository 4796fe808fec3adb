"""Does the teacher keep the context's characters? Sample next shots with and without context.

For a few prepared (history, next shot) samples whose records carry facts, the same initial noise
is denoised twice with the recipe's sampler: once conditioned on the context frames, once on the
captions alone. Both results are decoded with the recipe's codec and scored with
`distill.eval.metrics.colour_consistency` against the facts of the target shot. Ranks split the samples
and sum their scores, so the forward passes go through the (possibly ZeRO-3) engine on every rank.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from distill.data.components import build_codec, prepared_dir
from distill.data.datasets import ShotDataset
from distill.eval.metrics import colour_consistency
from distill.eval.multishot import guided_negative
from teacher.encoders import pixels_to_uint8
from teacher.sampler import draw_noise, sample
from student.context import Context


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
    extra = {}
    if with_context:
        extra = Context.stack([item["context"]]).to(device, dtype).kwargs()
    text = item["text"][None].to(device, dtype)
    denoise = lambda x, t, txt: model(x, t, txt, **extra)  # noqa: E731
    s = cfg.sampler
    return sample(denoise, text, noise, negative_text=negative, guidance_scale=s.guidance_scale,
                  steps=s.steps, shift=s.shift).x0


@torch.no_grad()
def evaluate_teacher(model, cfg: DictConfig, env) -> dict[str, float]:
    """{eval_colour_with_context, eval_colour_without_context}, averaged over `teacher.eval_samples`
    next shots; {} when none is asked for or no prepared record carries facts."""
    from distill.distributed import all_sum

    if cfg.teacher.eval_samples == 0:
        return {}
    dataset = ShotDataset(prepared_dir(cfg), cfg.data.context.strategy, cfg.data.context.budget)
    items = eval_items(dataset, cfg.teacher.eval_samples)
    if not items:
        return {}
    device = env.device
    dtype = next(model.parameters()).dtype
    codec = build_codec(cfg.codec, device)
    negative = guided_negative(cfg, device, dtype)
    totals = torch.zeros(3, dtype=torch.float64)
    for k in items[env.rank::env.world_size]:
        item = dataset[k]
        record = dataset.data.records[dataset.items[k][0]]
        gen = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + k)
        noise = draw_noise((1, *item["latents"].shape), gen, dtype, device)
        for slot, with_context in ((0, True), (1, False)):
            latents = _shot(model, item, noise, negative, cfg, with_context, device, dtype)
            frames = pixels_to_uint8(codec.decode(latents.float())[0].cpu())
            totals[slot] += colour_consistency(frames, record["facts"], int(item["target_shot"]))
        totals[2] += 1
    totals = all_sum(totals.to(device)).cpu()
    return {"eval_colour_with_context": float(totals[0] / totals[2]),
            "eval_colour_without_context": float(totals[1] / totals[2])}
