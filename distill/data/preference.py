"""Preference pairs for Diffusion-DPO (distill/stages/dpo.py): the true next shot against a mismatched one.

Item i is a `ShotDataset` sample (target latents, text, context) plus `loser`, a shot of the same latent
length that does not follow this history (STAGE §3 builds its losers from the same clip; ours):

- ``other_record``: a shot of another record (what the prompt and history do not describe);
- ``wrong_shot``: another shot of the same record (right characters, wrong transition);
- ``manifest``: the shot's own `rejected` clip from the manifest (distill/data/manifest.py), a
  human- or model-judged worse continuation of the same history and caption.

One source is drawn per pair among the listed ones that have a candidate for the sample, then one
candidate; samples with no candidate in any listed source are left out. The draws are a pure function
of (run seed, epoch, sample index), so resume and every rank see the same pairs.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

import torch

from distill.data.datasets import ShotDataset
from distill.seeds import derive_seed
from student.memory import MemoryRule

PAIR_SOURCES = ("other_record", "wrong_shot", "manifest")


def check_sources(sources: Sequence[str]) -> tuple[str, ...]:
    """The listed loser sources, or ValueError naming dpo.pairs."""
    sources = tuple(sources)
    unknown = [s for s in sources if s not in PAIR_SOURCES]
    if not sources or unknown or len(set(sources)) != len(sources):
        raise ValueError(f"dpo.pairs must list distinct sources among {', '.join(PAIR_SOURCES)}; got {list(sources)}")
    return sources


class PreferenceDataset:
    """(winner, loser) pairs over a prepared folder; a `DataStream` dataset (`group`, `set_epoch`)."""

    def __init__(self, folder: str | Path, strategy: str, budget: int, sources: Sequence[str], seed: int,
                 memory: MemoryRule | None = None) -> None:
        self.shots = ShotDataset(folder, strategy, budget, memory=memory)
        self.sources, self.seed, self.epoch = check_sources(sources), seed, 0
        records = self.shots.data.records
        self._by_length: dict[int, list[tuple[int, int]]] = {}
        for r, rec in enumerate(records):
            for k, frames in enumerate(rec["latent_frames"]):
                self._by_length.setdefault(frames, []).append((r, k))
        self.items = [i for i in range(len(self.shots)) if any(self.candidates(i, s) for s in self.sources)]
        if not self.items:
            raise ValueError(f"{folder}: no sample has a loser of its length among dpo.pairs={list(self.sources)}")

    def candidates(self, i: int, source: str) -> list[tuple[int, int]]:
        """(record, shot) losers of `source` for shot-dataset item i: same latent length, never the target."""
        r, target = self.shots.items[i]
        frames = self.shots.data.records[r]["latent_frames"][target]
        same = self._by_length[frames]
        if source == "manifest":  # its own rejected clip, prepared to the target's length
            return [(r, target)] if target in self.shots.data.records[r].get("rejected", ()) else []
        if source == "other_record":
            return [(r2, k) for r2, k in same if r2 != r]
        return [(r2, k) for r2, k in same if r2 == r and k != target]

    def loser(self, j: int) -> tuple[str, tuple[int, int]]:
        """(source, (record, shot)) of pair j this epoch."""
        i = self.items[j]
        rng = random.Random(derive_seed(self.seed, f"dpo-loser/{self.epoch}", j))
        source = rng.choice([s for s in self.sources if self.candidates(i, s)])
        return source, rng.choice(self.candidates(i, source))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def group(self, j: int):
        return self.shots.group(self.items[j])

    def __getitem__(self, j: int) -> dict:
        item = self.shots[self.items[j]]
        source, (r, k) = self.loser(j)
        data = self.shots.data
        name = f"shot{k}/rejected" if source == "manifest" else f"shot{k}/latents"
        item["loser"] = data.tensor(data.records[r], name)
        item["loser_source"] = torch.tensor(self.sources.index(source))
        return item
