"""The training loop every stage shares: one DeepSpeed engine per trained model, any number of them.

A stage hands the trainer its trained models (`TrainedModel`: name, module, update every N steps),
a resumable data source and a step function that returns the losses of the models due this step.
The trainer owns everything else: backward and gradient accumulation, the bad-step checks (agreed
across ranks before anything steps), clipping and warmup, our single step counter, TensorBoard,
checkpoints, preemption signals and resume.

A step is bad when a loss or gradient norm is not finite or spikes: above `train.spike_factor` ×
the median of its last `train.bad_window` finite values. A bad loss skips every update of the step
(the gradient norm is known only once its engine has stepped, so a gradient spike is counted, not
undone). `train.max_bad_steps` bad steps within the last `train.bad_window` stop the run, and no
checkpoint is saved or pruned while the newest step is bad, so the last good checkpoint survives.
"""

from __future__ import annotations

import math
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from omegaconf import DictConfig

from distill import checkpoint, keys, layout
from distill.deepspeed_config import deepspeed_config
from distill.distributed import all_sum, barrier, broadcast_object, prepare_deepspeed
from distill.logging import StageLogger
from teacher.files import write_atomic


@dataclass
class TrainedModel:
    """A model the stage trains: `name` selects `optim.<name>` and names its engine and tags."""

    name: str
    module: torch.nn.Module
    every: int = 1  # updated on trainer steps where step % every == 0 (0-based step)
    # called with our step counter after each applied update of this model (e.g. an EMA)
    after_update: Callable[[int], None] | None = None
    # judge this model's loss and grad norm for spikes (train.spike_factor); off for a surrogate loss
    # whose scale starts at zero and grows by orders of magnitude by design (DMD's generator)
    spikes: bool = True


class DataSource(Protocol):
    """What the trainer draws micro-batches from; the data helper's datasets follow it.

    `next(source)` returns one micro-batch for this rank. Its order is a pure function of
    (seed, epoch, rank, world size), and `state_dict()` captures the position so that
    `load_state_dict()` continues exactly where the checkpoint left off.
    """

    def __next__(self) -> Any: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


# step_fn(batch, due model names, step) -> {model name: scalar loss for every due model,
# any other name: a scalar to log}. Losses of different models must not share an autograd graph,
# and every rank must return the same names (they are summed over ranks in one collective).
StepFn = Callable[[Any, frozenset, int], dict[str, torch.Tensor]]


class Preempted(Exception):
    """SIGTERM/SIGUSR1/SIGINT arrived: a checkpoint was saved and the run stops. `signum` is the signal
    (SIGTERM when only another rank was signalled); the process exits with 128 + signum (143, 130)."""

    signum: int = signal.SIGTERM


class TooManyBadSteps(RuntimeError):
    """`train.max_bad_steps` bad steps (non-finite or spiking) within `train.bad_window` steps."""


SPIKE_HISTORY = 5  # finite values a series needs before its spikes are judged


class BadSteps:
    """The bad-step bookkeeping: which of the last `window` steps were bad (and why), and each
    watched series' last `window` finite values, the reference its spikes are judged against.
    Plain lists and numbers only, so it checkpoints and resumes exactly."""

    def __init__(self, factor: float, window: int):
        self.factor, self.window = factor, window
        self.recent: list[int] = []               # 1 per bad step, 0 per good one, newest last
        self.values: dict[str, list[float]] = {}  # series name -> last finite values
        self.reasons: list[str] = []              # why the newest bad steps were bad

    def spike(self, name: str, value: float) -> str | None:
        """Why `value` of series `name` spikes, or None (non-finite values are judged elsewhere)."""
        history = self.values.get(name, [])
        if self.factor <= 0 or len(history) < SPIKE_HISTORY or not math.isfinite(value):
            return None
        median = sorted(history)[len(history) // 2]
        if median > 0 and value > self.factor * median:
            return f"{name}={value:.4g} is over {self.factor:g}x its median {median:.4g}"
        return None

    def observe(self, name: str, value: float) -> None:
        if math.isfinite(value):
            self.values[name] = (self.values.get(name, []) + [float(value)])[-self.window:]

    def count(self, step: int, reasons: list[str]) -> None:
        self.recent = (self.recent + [int(bool(reasons))])[-self.window:]
        if reasons:
            self.reasons = (self.reasons + [f"step {step}: {'; '.join(reasons)}"])[-3:]

    @property
    def in_window(self) -> int:
        return sum(self.recent)

    def state_dict(self) -> dict:
        return {"recent": list(self.recent), "values": {k: list(v) for k, v in self.values.items()},
                "reasons": list(self.reasons)}

    def load_state_dict(self, state: dict) -> None:
        self.recent, self.reasons = list(state["recent"]), list(state["reasons"])
        self.values = {k: list(v) for k, v in state["values"].items()}


class Warmup:
    """The lr of one model per applied update (checkpointed): linear warmup to the peak, then constant
    or decaying (cosine / linear) to `floor`·peak at the stage's last update, `horizon` updates."""

    def __init__(self, peak: float, warmup: int, decay: str = "none", floor: float = 0.0, horizon: int = 0):
        self.peak, self.warmup, self.updates = peak, warmup, 0
        self.decay, self.floor, self.horizon = decay, floor, horizon

    def lr(self) -> float:
        if self.warmup > 0 and self.updates < self.warmup:
            return self.peak * (self.updates + 1) / self.warmup
        if self.decay == "none" or self.horizon <= self.warmup:
            return self.peak
        done = min(1.0, (self.updates - self.warmup) / (self.horizon - self.warmup))
        shape = 0.5 * (1 + math.cos(math.pi * done)) if self.decay == "cosine" else 1 - done
        return self.peak * (self.floor + (1 - self.floor) * shape)

    def state_dict(self) -> dict:
        return {"updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]


def _client_optimizer(module: torch.nn.Module, optim: DictConfig, offload: bool):
    """AdamW built by us; DeepSpeed's CPU Adam (a JIT-compiled op) only when states live on CPU."""
    params = [p for p in module.parameters() if p.requires_grad]
    kwargs = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                  weight_decay=optim.weight_decay)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def build_engine(model: TrainedModel, cfg: DictConfig, stage_dir: Path, env) -> Any:
    """One DeepSpeed engine for `model`; its derived JSON goes to `<stage>/deepspeed.<name>.json`."""
    import deepspeed
    prepare_deepspeed(env.cuda)
    if model.name not in cfg.optim:
        raise ValueError(f"model '{model.name}' has no optimizer section optim.{model.name}")
    ds_cfg = deepspeed_config(cfg, model.name, env.world_size, env.cuda)
    if env.is_main:
        import json
        write_atomic(Path(stage_dir) / f"deepspeed.{model.name}.json", json.dumps(ds_cfg, indent=2) + "\n")
    module = model.module.to(env.device)
    optimizer = _client_optimizer(module, cfg.optim[model.name], cfg.deepspeed.offload_optimizer)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_cfg)
    register_external_parameters(engine)
    return engine


def register_external_parameters(engine) -> None:
    """ZeRO-3 gathers a parameter only inside its owning module's forward; a model that reads some
    as attributes elsewhere lists them in `external_parameters()`, and registering them with the
    engine's top module keeps them gathered for its whole forward and backward."""
    if engine.zero_optimization_stage() != 3:
        return
    import deepspeed

    external = getattr(engine.module, "external_parameters", None)
    for param in external() if external is not None else ():
        deepspeed.zero.register_external_parameter(engine.module, param)


def gathered(engine):
    """Full parameters of an engine's module inside the block (ZeRO-3 gathers them on every rank)."""
    if engine.zero_optimization_stage() != 3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)


def place_frozen(module: torch.nn.Module, cfg: DictConfig, env) -> Any:
    """A frozen model (teacher, real score) ready for forward: a plain module on the device in the
    training dtype, or, with `deepspeed.frozen_zero3`, a ZeRO-3 partitioned engine (no optimizer)."""
    module.requires_grad_(False).eval()
    ds = cfg.deepspeed
    if not ds.frozen_zero3:
        return module.to(env.device, env.dtype(ds.bf16))
    import deepspeed
    prepare_deepspeed(env.cuda)
    config = {"train_micro_batch_size_per_gpu": cfg.train.micro_batch,
              "zero_optimization": {
                  "stage": 3, "stage3_prefetch_bucket_size": ds.prefetch_bucket_size,
                  "stage3_param_persistence_threshold": ds.param_persistence_threshold},
              "bf16": {"enabled": bool(ds.bf16 and env.cuda)}}
    engine, *_ = deepspeed.initialize(model=module.to(env.device), config=config)
    engine.eval()
    register_external_parameters(engine)
    return engine


class _StopSignals:
    """Remember SIGTERM/SIGUSR1 (cluster preemption) and SIGINT (Ctrl-C) until the step ends; restore on
    exit, telling a Preempted leaving the block which signal it was."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __enter__(self):
        self.received: int | None = None
        self.previous = {s: signal.signal(s, self._on) for s in self.SIGNALS}
        return self

    def _on(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, exc_type, exc, tb) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if isinstance(exc, Preempted) and self.received is not None:
            exc.signum = self.received


def _schedule(optim: DictConfig, horizon: int) -> Warmup:
    return Warmup(optim.lr, optim.warmup, optim.decay, optim.min_lr, horizon)


class Trainer:
    """Train `models` with `step_fn` on `data` for `train.steps` steps of ours.

    `trainer.engines[name]` is the DeepSpeed engine of each model: call it (not the bare module)
    in the step function, so ZeRO-3 can gather parameters and bf16 applies.
    """

    def __init__(self, cfg: DictConfig, ctx, models: list[TrainedModel], data: DataSource,
                 step_fn: StepFn, extra_state: dict[str, Any] | None = None):
        names = [m.name for m in models]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"trained models need distinct names, got {names}")
        self.cfg, self.ctx, self.env = cfg, ctx, ctx.env
        self.models, self.data, self.step_fn = models, data, step_fn
        # a stage's own resumable objects (state_dict/load_state_dict), kept in each rank's state
        self.extra_state = dict(extra_state or {})
        self.engines = {m.name: build_engine(m, cfg, ctx.stage_dir, self.env) for m in models}
        self.warmup = {m.name: _schedule(cfg.optim[m.name], -(-cfg.train.steps // m.every)) for m in models}
        self.step = 0  # our one step counter (each engine keeps its own, which we ignore)
        self.bad_total = 0
        self.bad_streak = 0
        self.bad = BadSteps(cfg.train.spike_factor, cfg.train.bad_window)
        self.reasons: list[str] = []  # why the newest step was bad
        self.watched = {m.name for m in models if m.spikes}
        self.last: dict[str, float] = {}
        self.ckpt_root = Path(ctx.stage_dir) / layout.CHECKPOINTS
        # Models are built alike on every rank (runner seeded run.seed); noise differs per rank.
        checkpoint.seed_all(cfg.run.seed + self.env.rank)

    # ------------------------------------------------------------------ state

    def _client_state(self) -> dict:
        return {"step": self.step, "bad_total": self.bad_total, "bad_streak": self.bad_streak,
                "bad_steps": self.bad.state_dict(), "last": dict(self.last), "data": self.data.state_dict(),
                "warmup": {n: w.state_dict() for n, w in self.warmup.items()},
                "extra": {n: obj.state_dict() for n, obj in self.extra_state.items()}}

    def save(self) -> Path:
        folder = checkpoint.step_dir(self.ckpt_root, self.step)
        checkpoint.save(folder, self.engines, self._client_state(), self.env,
                        fingerprint=getattr(self.ctx, "fingerprint", None))
        if self.env.is_main:
            checkpoint.prune(self.ckpt_root, self.cfg.train.keep_checkpoints)
        barrier()
        return folder

    def _note(self, text: str) -> None:
        if self.env.is_main:
            print(f"shotdistill: {text}", file=sys.stderr, flush=True)

    def _restore_state(self) -> tuple[Path | None, dict]:
        """The checkpoint to resume and this rank's state in it: the newest committed checkpoint
        whose files are all there (sizes as written) and whose rank states every rank can read;
        each one passed over is named, with why. (None, {}) to start fresh."""
        folders, notes = None, []
        if self.env.is_main:
            try:
                found, notes = checkpoint.candidates(self.cfg.resume, self.ckpt_root,
                                                     self.env.world_size)
                folders = [str(f) for f in found]
            except checkpoint.CheckpointError as e:
                folders, notes = str(e), []
            for note in notes:
                self._note(note)
            if folders == [] and not notes and self.ckpt_root.exists():
                shutil.rmtree(self.ckpt_root)  # starting fresh: older checkpoints are stale
        folders = broadcast_object(folders)
        if isinstance(folders, str):
            raise checkpoint.CheckpointError(folders)
        errors = []
        for folder in map(Path, folders):
            try:
                state, error = checkpoint.load_state(folder, self.env), ""
            except checkpoint.CheckpointError as e:
                state, error = None, str(e)
            # every rank learns whether any rank failed, so all of them move on together
            failed = all_sum(torch.tensor([float(state is None)], device=self.env.device))
            if failed.item() == 0:
                if errors or notes:
                    self._note(f"resuming from {folder}, the newest usable committed checkpoint")
                return folder, state
            errors.append(error)
            self._note(f"checkpoint {folder} is unusable: {error or 'another rank failed'}; "
                       "passing over it")
        if self.cfg.resume not in ("auto", "never") and errors:
            raise checkpoint.CheckpointError(errors[0] or f"checkpoint {folders[0]} is unusable")
        if self.cfg.resume == "auto" and (errors or checkpoint.committed(self.ckpt_root)):
            raise checkpoint.CheckpointError(
                f"no usable committed checkpoint in {self.ckpt_root} (see above); resume=never "
                "starts the stage over, resume=<folder> picks one")
        return None, {}

    def resume(self) -> int:
        """Restore the checkpoint `resume` selects (if any); return the step training starts at."""
        folder, state = self._restore_state()
        if folder is None:
            return 0
        # made with other recipe keys: stop naming them, unless resume=force (distill/keys.py)
        keys.check_fingerprint(checkpoint.read_marker(folder).get("fingerprint"), getattr(self.ctx, "fingerprint", None),
                               f"checkpoint {folder}", force=getattr(self.ctx, "force", False))
        checkpoint.load_engines(folder, self.engines)
        checkpoint.restore_rng(state.pop("rng"))
        self.step, self.bad_total = state["step"], state["bad_total"]
        self.bad_streak, self.last = state["bad_streak"], state["last"]
        if "bad_steps" in state:  # checkpoints written before spikes were watched have none
            self.bad.load_state_dict(state["bad_steps"])
        self.data.load_state_dict(state["data"])
        for name, w in self.warmup.items():
            w.load_state_dict(state["warmup"][name])
        for name, obj in self.extra_state.items():
            obj.load_state_dict(state["extra"][name])
        if self.env.is_main:
            checkpoint.prune(self.ckpt_root, self.cfg.train.keep_checkpoints,
                             resumed_from=self.step)
        barrier()
        return self.step

    # ------------------------------------------------------------------ one step

    def _due(self) -> list[str]:
        return [m.name for m in self.models if self.step % m.every == 0]

    def _micro_step(self, due: list[str], boundary: bool, bad: bool,
                    reasons: list[str]) -> tuple[dict, bool]:
        """Forward + backward of one micro-batch; return rank-averaged scalars and the bad flag
        (a loss that is not finite on some rank, or whose rank mean spikes; why goes to `reasons`)."""
        out = self.step_fn(next(self.data), frozenset(due), self.step)
        missing = [n for n in due if n not in out]
        if missing:
            raise ValueError(f"step function returned no loss for {', '.join(missing)} "
                             f"at step {self.step}")
        names = due + sorted(k for k in out if k not in due)
        local = torch.stack([torch.as_tensor(out[n], device=self.env.device).detach().float()
                             .reshape(()) for n in names])
        nonfinite = (~torch.isfinite(local[:len(due)])).sum().float().reshape(1)
        # One collective per micro-batch: the losses to log and whether any rank saw a NaN/inf.
        stats = all_sum(torch.cat([local, nonfinite]))
        means = {n: v.item() / self.env.world_size for n, v in zip(names, stats[:-1])}
        if stats[-1].item() > 0:
            named = [f"{n}/loss" for n in due if not math.isfinite(means[n])]
            reasons.append(f"{', '.join(named) or 'a loss'} not finite")
        # every rank sees the same means and history, so every rank judges alike
        reasons += [why for n in due if n in self.watched
                    and not any(r.startswith(f"{n}/loss") for r in reasons)
                    and (why := self.bad.spike(f"{n}/loss", means[n]))]
        bad = bad or bool(reasons)
        for name in due:
            engine = self.engines[name]
            engine.set_gradient_accumulation_boundary(boundary)
            # Every rank agreed the step is bad: NaN gradients everywhere route it through
            # DeepSpeed's own overflow path, the one that discards partitioned accumulated grads.
            engine.backward(out[name] * math.nan if bad else out[name])
        return means, bad

    def _update(self, name: str, bad: bool) -> tuple[float, float, bool]:
        """Step one engine at the accumulation boundary; return (grad norm, lr, applied)."""
        engine = self.engines[name]
        lr = self.warmup[name].lr()
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        if engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled():
            # Plain fp32 DeepSpeed never checks gradients: check the (already reduced) norm here.
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
            applied = not bad and math.isfinite(norm)
            engine.step() if applied else engine.zero_grad()
        else:
            engine.step()  # ZeRO / bf16 discard a step whose gradient norm is not finite
            reported = engine.get_global_grad_norm()
            norm = float("nan") if reported is None else float(reported)
            applied = (not bad and engine.was_step_applied()
                       and (reported is None or math.isfinite(norm)))
        if applied:
            self.warmup[name].updates += 1
        return norm, lr, applied

    def train_step(self) -> dict[str, float]:
        """One step of ours: grad_accum micro-batches for every due model, then their updates."""
        due, loss_bad, sums, reasons = self._due(), False, {}, []
        accum = self.cfg.train.grad_accum
        for micro in range(accum):
            means, loss_bad = self._micro_step(due, micro == accum - 1, loss_bad, reasons)
            for k, v in means.items():
                sums[k] = sums.get(k, 0.0) + v / accum
        record = {}
        for name in due:
            # A bad loss skips every engine; a bad gradient norm skips only its own engine.
            norm, lr, applied = self._update(name, loss_bad)
            if not applied and not loss_bad:
                reasons.append(f"{name}/grad_norm is {norm}")
            elif name in self.watched and (why := self.bad.spike(f"{name}/grad_norm", norm)):
                reasons.append(why)  # applied already: counted, not undone
            hook = next(m.after_update for m in self.models if m.name == name)
            if applied and hook is not None:
                hook(self.step)
            record.update({f"{name}/loss": sums.pop(name), f"{name}/grad_norm": norm,
                           f"{name}/lr": lr})
        for name in due:
            for series in (f"{name}/loss", f"{name}/grad_norm"):
                self.bad.observe(series, record[series])
        record.update(sums)
        self.reasons = reasons
        return {**record, "bad": float(bool(reasons))}

    # ------------------------------------------------------------------ the loop

    def _count(self, bad: bool) -> None:
        self.bad_total += int(bad)
        self.bad_streak = self.bad_streak + 1 if bad else 0
        self.bad.count(self.step, self.reasons if bad else [])

    def _last_committed(self) -> str:
        done = checkpoint.committed(self.ckpt_root)
        return str(done[-1][1]) if done else "none"

    def _check_streak(self) -> None:
        train = self.cfg.train
        if self.bad.in_window >= train.max_bad_steps:
            raise TooManyBadSteps(
                f"{self.bad.in_window} bad steps in the last {len(self.bad.recent)} "
                f"(train.max_bad_steps={train.max_bad_steps}, train.bad_window={train.bad_window}; "
                f"{self.bad.reasons[-1]}) at step {self.step}; last committed checkpoint: "
                f"{self._last_committed()}")

    def _stop_requested(self, signals: _StopSignals) -> bool:
        """Every rank learns whether any rank was signalled, so all of them stop together."""
        flag = torch.tensor([float(signals.received is not None)], device=self.env.device)
        return all_sum(flag).item() > 0

    def fit(self) -> dict[str, float]:
        """Train to `train.steps` (resuming first); return the final metrics."""
        train, log_cfg = self.cfg.train, self.cfg.logging
        start = self.resume()
        stage = Path(self.ctx.stage_dir).name
        log = StageLogger(self.ctx.tb_dir, stage, main=self.env.is_main,
                          tensorboard=log_cfg.tensorboard, progress=log_cfg.progress,
                          total_steps=train.steps, start_step=start)
        samples = train.micro_batch * train.grad_accum * self.env.world_size
        pending = False  # a checkpoint the cadence asked for during a bad streak
        try:
            with _StopSignals() as signals:
                while self.step < train.steps:
                    t0 = time.perf_counter()
                    record = self.train_step()
                    bad = record.pop("bad") > 0
                    self.step += 1
                    self._count(bad)
                    seconds = time.perf_counter() - t0
                    self.last.update({k: v for k, v in record.items() if math.isfinite(v)})
                    if bad or self.step % log_cfg.every == 0:
                        log.scalars(self.step, {**record, "bad_steps": self.bad_total,
                                                "step_time": seconds,
                                                "samples_per_s": samples / seconds})
                    log.advance({k: v for k, v in record.items() if k.endswith("/loss")})
                    self._check_streak()
                    stop = self._stop_requested(signals)
                    due = self.step % train.checkpoint_every == 0 or self.step == train.steps
                    # Never during a bad streak (the last good checkpoint must survive it): a
                    # save the cadence asks for then waits for the next good step.
                    if bad:
                        pending = pending or due
                    elif stop or due or pending:
                        pending = False
                        log.flush()
                        self.save()
                    if stop and bad:
                        raise Preempted(f"stopped by signal at step {self.step}, a bad step: no "
                                        "checkpoint saved; resume=auto continues from "
                                        f"{self._last_committed()}")
                    if stop:
                        raise Preempted(f"stopped by signal at step {self.step}; checkpoint "
                                        "saved, resume=auto continues from it")
        finally:
            log.close()
        return {**self.last, "steps": float(self.step), "bad_steps": float(self.bad_total)}
