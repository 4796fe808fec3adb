"""ODE pairs read back as training samples for the causal init (written by distill/stages/ode_pairs.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from distill.data.shards import INDEX, ShardReader, read_json
from student.context import Context


class OdePairDataset:
    """An ODE-pair folder as samples: item n is pair n of index.json (a `DataStream` dataset).

    Items hold float32 tensors: noise, trajectory [K, C, F, h, w], x0, text, the `Context` (its texts
    rebuilt from the per-shot texts); plus the pair's record and target shot.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = read_json(self.folder / INDEX)
        if index is None:
            raise FileNotFoundError(f"{self.folder / INDEX}: no ODE pairs (run the ode_pairs stage)")
        self.timesteps: list[float] = index["timesteps"]
        self.pairs: list[dict] = index["pairs"]
        self.reader = ShardReader(self.folder)
        if not self.pairs:
            raise ValueError(f"{self.folder / INDEX}: no pairs")

    def __len__(self) -> int:
        return len(self.pairs)

    def group(self, n: int) -> tuple[int, int]:
        """Pairs with the same context and target lengths stack into a batch."""
        return self.pairs[n]["context_frames"], self.pairs[n]["frames"]

    def tensor(self, pair: dict, key: str) -> torch.Tensor:
        return self.reader.get(pair["shard"], f"{pair['slot']}/{key}")

    def __getitem__(self, n: int) -> dict:
        pair = self.pairs[n]
        shots = self.tensor(pair, "context_shot").long()
        _, which = torch.unique(shots, return_inverse=True)
        out = {key: self.tensor(pair, key).float() for key in ("noise", "trajectory", "x0", "text")}
        out["context"] = Context(self.tensor(pair, "context").float(), self.tensor(pair, "shot_texts").float()[which],
                                 shots)
        return {**out, "record": pair["record"],
                "target_shot": torch.tensor(pair["target_shot"]), "pair": torch.tensor(pair["pair"])}
