"""Rank-0 output of a training stage: TensorBoard scalars and a progress bar.

Tags are `<stage>/<name>`, events go to `<run>/tb/<stage>/`. A resumed stage reopens the same
folder with `purge_step` = the first step it will redo, so TensorBoard drops what the interrupted
run logged past its last checkpoint and the curves continue without a fork.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


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
            _wait_past_existing_events(Path(tb_dir))
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


def _wait_past_existing_events(tb_dir: Path) -> None:
    """TensorBoard reads event files in name order, and names start with the creation second:
    a restart within the same second as the previous writer would sort before it."""
    stamps = [int(p.name.split(".")[3]) for p in tb_dir.glob("events.out.tfevents.*")
              if p.name.split(".")[3].isdigit()]
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
