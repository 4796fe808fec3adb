"""The DeepSpeed JSON of one trained model, derived from the recipe (the one source of truth).

Only what DeepSpeed itself must know goes here: batch geometry, ZeRO, precision, clipping. The
optimizer is a client optimizer built by the trainer and the learning-rate schedule is ours, so
neither appears in the JSON.
"""

from __future__ import annotations

from omegaconf import DictConfig


def deepspeed_config(cfg: DictConfig, model: str, world_size: int, cuda: bool) -> dict:
    """DeepSpeed config dict for the engine training `model` (a name under `optim.`)."""
    ds, train, optim = cfg.deepspeed, cfg.train, cfg.optim[model]
    if ds.offload_params and ds.zero_stage != 3:
        raise ValueError(f"deepspeed.offload_params needs deepspeed.zero_stage=3, got {ds.zero_stage}")
    if ds.offload_optimizer and ds.zero_stage < 2:
        raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage 2 or 3, "
                         f"got {ds.zero_stage}")
    zero: dict = {"stage": ds.zero_stage, "reduce_bucket_size": ds.reduce_bucket_size}
    if ds.zero_stage in (1, 2):
        zero["allgather_bucket_size"] = ds.allgather_bucket_size
    if ds.zero_stage == 3:
        zero["stage3_prefetch_bucket_size"] = ds.prefetch_bucket_size
        zero["stage3_param_persistence_threshold"] = ds.param_persistence_threshold
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch * train.grad_accum * world_size,
        "gradient_clipping": float(optim.clip),
        "zero_optimization": zero,
        # A non-finite gradient must always discard the step, in bf16 as in fp32.
        "bf16": {"enabled": bool(ds.bf16 and cuda), "check_grad_overflow": True},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
