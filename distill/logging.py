"""Rank-0 output of a training stage: TensorBoard scalars and a progress bar.

Tags are `<stage>/<name>`, events go to `<run>/tb/<stage>/`. A resumed stage reopens the same
folder with `purge_step` = the first step it will redo, so TensorBoard drops what the interrupted
run logged past its last checkpoint and the curves continue without a fork.

At stage start the runner adds the stage's resolved recipe as HParams session info and one
custom-scalars layout (`write_run_info`) to the same folder, so every stage folder is one
TensorBoard run that the HParams tab compares and the Custom Scalars tab groups by stage.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


# Deprecation warnings of libraries we call, about their own use of their dependencies: nothing a
# user can act on. (category, message regex, module regex of the line the warning names).
THIRD_PARTY_DEPRECATIONS = (
    # DeepSpeed's collectives call torch.distributed.all_gather_into_tensor/reduce_scatter_tensor
    # (every ZeRO-3 step); the warning names torch's own wrapper, c10d_logger.
    (FutureWarning, r"`torch\.distributed\.\w+` is deprecated", r"torch\.distributed(\.|$)"),
    (DeprecationWarning, r"`torch\.jit\.script_method` is deprecated", r"torch\.jit(\.|$)"),
    (FutureWarning, "", r"deepspeed(\.|$)"),
    (DeprecationWarning, "", r"deepspeed(\.|$)"),
    (FutureWarning, "", r"diffusers(\.|$)"),
    (DeprecationWarning, "", r"diffusers(\.|$)"),
)
OUR_MODULES = r"(launch|distill|student|teacher|kernels)(\.|$)"


def quiet_console(rank: int) -> None:
    """Once at process start (CLI entry, process-group set-up): hide the known third-party
    deprecations and the libraries' per-model load/save bars, show each of our own warnings once, and
    keep ranks other than 0 silent but for errors (their failures still print; every progress bar is
    rank 0's)."""
    import logging
    import os
    import warnings

    for category, message, module in THIRD_PARTY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    warnings.filterwarnings("once", module=OUR_MODULES)
    # diffusers/transformers draw a bar for every model saved or loaded: the stage's bar is the one bar
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if rank != 0:
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)          # every logger, DeepSpeed's included: errors only
        os.environ["TQDM_DISABLE"] = "1"          # third-party bars; read when tqdm is imported


class StageLogger:
    """Scalars and progress of one stage; every method is a no-op off rank 0."""

    def __init__(self, tb_dir: Path, stage: str, *, main: bool, tensorboard: bool, progress: bool,
                 total_steps: int, start_step: int):
        self.stage = stage
        self.writer = None
        self.bar = None
        if not main:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            Path(tb_dir).mkdir(parents=True, exist_ok=True)
            wait_past_existing_events(Path(tb_dir))
            # Logged steps are 1-based (step k = after k updates), so purging from start+1 drops
            # exactly the steps this run will produce again.
            self.writer = SummaryWriter(str(tb_dir), purge_step=start_step + 1)
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc=stage, file=sys.stderr,
                            dynamic_ncols=True, mininterval=1.0)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(f"{self.stage}/{name}", value, global_step=step)
        self.writer.flush()  # a killed run keeps what it logged (the resume then purges it)

    def advance(self, postfix: dict[str, float] | None = None) -> None:
        if self.bar is None:
            return
        if postfix:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
        self.bar.update(1)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()


def log_once(tb_dir: Path, prefix: str, step: int, scalars: dict[str, float], *, main: bool,
             enabled: bool = True, replace: bool = False) -> None:
    """Write a handful of scalars once, as `<prefix>/<name>` at `step` (end-of-stage results, a
    stage without a training loop); a no-op off rank 0 or when TensorBoard is off (`enabled`).

    Points logged earlier at steps after `step` are dropped; `replace=True` also drops earlier
    points at `step` itself (a re-evaluation into the same folder replaces the previous one).
    """
    if not main or not enabled:
        return
    # StageLogger purges from start_step + 1.
    log = StageLogger(tb_dir, prefix, main=True, tensorboard=True, progress=False, total_steps=step,
                      start_step=step - 1 if replace else step)
    try:
        log.scalars(step, scalars)
    finally:
        log.close()


def log_final(ctx, cfg, scores: dict[str, float]) -> None:
    """A stage's end-of-stage scalars (its probes) in its TensorBoard folder, at the last training step."""
    log_once(ctx.tb_dir, Path(ctx.stage_dir).name, cfg.train.steps, scores, main=ctx.env.is_main,
             enabled=cfg.logging.tensorboard)


def wait_past_existing_events(tb_dir: Path) -> None:
    """TensorBoard reads event files in name order, and names start with the creation second:
    a restart within the same second as the previous writer would sort before it. Run-info files
    hold only step-0 summaries, which no purge touches, so their order does not matter."""
    stamps = [int(p.name.split(".")[3]) for p in tb_dir.glob("events.out.tfevents.*")
              if p.name.split(".")[3].isdigit() and not p.name.endswith(RUN_INFO_SUFFIX)]
    while stamps and int(time.time()) <= max(stamps):
        time.sleep(0.05)


def read_scalars(tb_dir: Path, tag: str) -> dict[int, float]:
    """{step: value} of one tag as TensorBoard shows it (purged steps removed)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return {}
    return {e.step: e.value for e in acc.Scalars(tag)}


# ---------------------------------------------------------------- HParams and custom scalars

RUN_INFO_SUFFIX = ".runinfo"  # event files holding only the step-0 run info (write_run_info)
# Keys naming places on this machine: the same recipe run elsewhere must compare equal.
MACHINE_KEYS = frozenset({"run.out", "resume", "data.manifest", "data.prepared", "eval.export",
                          "eval.prompts"})


def recipe_hparams(cfg) -> dict[str, bool | int | float | str]:
    """The resolved recipe as HParams values under dotted keys: scalars as they are, lists as JSON
    strings; MACHINE_KEYS, every `*.path` and unset (None) values are left out."""
    from omegaconf import OmegaConf

    out: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, f"{name}.")
            elif value is None or name in MACHINE_KEYS or key == "path":
                continue
            else:
                out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else value

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def session_start_summary(hparams: dict[str, bool | int | float | str]):
    """The HParams plugin's session-start summary of `hparams`. Only this one of torch's three
    summaries is written: an Experiment summary in any run makes TensorBoard show that one run's
    hparams and metrics for the whole logdir; without one it derives the hparams from every run's
    session info and the metrics from every scalar tag of those runs (each run's last value)."""
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    _, start, _ = hparams_summaries(dict(hparams), {})
    # torch tests int before bool, so True would read as the number 1.
    plugin = start.value[0].metadata.plugin_data
    data = HParamsPluginData.FromString(plugin.content)
    for name, value in hparams.items():
        if isinstance(value, bool):
            data.session_start_info.hparams[name].bool_value = value
    data.session_start_info.start_time_secs = time.time()
    plugin.content = data.SerializeToString()
    return start


def _charts(folder: str, charts: dict[str, list[str]]) -> dict[str, list]:
    """Multiline charts of one stage folder (a plain name); each pattern follows `^<folder>/`."""
    return {title: ["Multiline", [f"^{folder}/{p}" for p in patterns]] for title, patterns in charts.items()}


def custom_scalars_layout() -> dict[str, dict[str, list]]:
    """One layout for every run: a category per stage folder, charts of tag regexes (TensorBoard
    applies `re.match` to every run's tags, so one layout serves all runs and ablations)."""
    dmd = {"generator loss": ["generator/loss$"], "critic loss": ["critic/loss$"],
           "grad norms": ["(generator|critic)/grad_norm$", "dmd_grad_norm$"],
           "learning rates": ["(generator|critic)/lr$"], "exit step": ["exit_step$"],
           "colour consistency": ["(student|teacher)_colour_"]}
    return {
        "prepare": _charts("prepare", {"records": [""]}),
        "teacher": _charts("teacher", {
            "loss": ["teacher/loss$"], "loss by timestep": [r"loss_t\d+-\d+$"],
            "grad norm": ["teacher/grad_norm$"], "learning rate": ["teacher/lr$"],
            "context used": ["context_used$"], "text dropped": ["text_dropped$"],
            "colour consistency": ["eval_colour_"]}),
        "causal-init": _charts("causal-init", {
            "loss": ["student/loss$"], "grad norm": ["student/grad_norm$"],
            "learning rate": ["student/lr$"],
            "distance to the teacher": ["eval_distance_", "eval_first_step_"]}),
        "ode-pairs": _charts("ode-pairs", {"pairs and shards": [""]}),
        "dmd-intra": _charts("dmd-intra", dmd),
        "dmd-inter": _charts("dmd-inter", dmd),
        # eval/<metric> of the final student and eval/<stage>/<metric> of each stage in eval.stages
        "eval": _charts("eval", {"throughput": ["([^/]+/)?(fps|latency_s)$"],
                                 "scores": ["([^/]+/)?(?!(fps|latency_s)$)[^/]+$"]}),
        "every stage": {"step time": ["Multiline", [r"^[^/]+/step_time$"]],
                        "samples per second": ["Multiline", [r"^[^/]+/samples_per_s$"]],
                        "bad steps": ["Multiline", [r"^[^/]+/bad_steps$"]]},
    }


def write_run_info(tb_dir: Path, cfg, *, main: bool, hparams: dict | None = None,
                   replace: bool = False) -> None:
    """At stage start, on rank 0 when TensorBoard is on: the recipe's hyperparameters (or `hparams`)
    and the custom-scalars layout into the stage's own run folder (a resume writes them again;
    TensorBoard still shows one run and one session, keyed by the folder). TensorBoard keeps the
    first session info it reads of a run, so a session whose hyperparameters differ from those
    written before (the eval's: distill/eval/hparams.py) `replace`s the folder's run-info files."""
    if not main or not cfg.logging.tensorboard:
        return
    from torch.utils.tensorboard import SummaryWriter

    hparams = recipe_hparams(cfg) if hparams is None else hparams
    Path(tb_dir).mkdir(parents=True, exist_ok=True)
    if replace:
        for old in Path(tb_dir).glob(f"events.out.tfevents.*{RUN_INFO_SUFFIX}"):
            old.unlink()
    writer = SummaryWriter(str(tb_dir), filename_suffix=RUN_INFO_SUFFIX)
    try:
        writer.file_writer.add_summary(session_start_summary(hparams))
        writer.add_custom_scalars(custom_scalars_layout())
    finally:
        writer.close()
