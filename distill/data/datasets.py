"""Datasets over a prepared folder: next-shot samples (teacher, intra-shot) and caption prompts (inter-shot).

`ShotDataset` item i is one (record, target shot) pair (with `negative`, its context may also hold an
irrelevant shot of another record, distill/data/negatives.py; with `references`, it may start with
crops of the target shot's own characters as shot −1, distill/data/references.py; `set_epoch` varies
those draws per epoch):

    latents       [C, F, h, w]      the target shot
    text          [L, D]            global ⊕ target caption tokens, zero-padded (L = 2·max_tokens)
    context       Context           history frames picked by teacher/context.py, their shots' texts
                                    and shot indices (student/context.py; Fc = 0 for a first shot)
    target_shot   []                index of the target shot in its video
    record        str               the record id

`PromptDataset` item i is one record: `texts` [S, L, D] (shot s: global ⊕ shot s tokens), the
captions, the global caption and the facts (for evaluation).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from distill.data.negatives import NegativeShot, insert_shot, pick_negative
from distill.data.references import pick_references
from distill.data.shards import INDEX, ShardReader, read_json
from student.context import Context, pick_context
from student.memory import MemoryRule
from teacher.context import RANKED, sample_context
from teacher.encoders import join_text, text_length


class PreparedData:
    """A prepared folder: its index and lazy access to record tensors."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = read_json(self.folder / INDEX)
        if index is None:
            raise FileNotFoundError(f"{self.folder / INDEX}: no prepared data (run the prepare stage)")
        self.settings: dict = index["settings"]
        self.records: list[dict] = index["records"]
        self.reader = ShardReader(self.folder)
        self.text_len = text_length(self.settings["text"]["max_tokens"])
        self.shot_frames = self.settings["shot_frames"]  # the longest a shot can be
        if self.settings.get("format") != 2:
            raise ValueError(f"{self.folder / INDEX}: prepared with an older format (one length for every "
                             "shot); prepare again")

    def tensor(self, record: dict, key: str) -> torch.Tensor:
        return self.reader.get(record["shard"], f"{record['slot']}/{key}").float()

    def shot_text(self, record: dict, shot: int) -> torch.Tensor:
        """[L, D]: shot `shot`'s model text in the prepared caption layout: the global caption's real
        tokens followed by the shot's ("separate"), or the prompt up to the shot as one string ("joint")."""
        if self.settings.get("caption_layout") == "joint":
            return self.tensor(record, f"shot{shot}/joint_text")
        parts = [self.tensor(record, "global_text"), self.tensor(record, f"shot{shot}/text")]
        return join_text(parts, self.text_len)

    def clip_feature(self, record: dict, shot: int, frame: int) -> torch.Tensor:
        """[D] the CLIP image feature of a candidate frame, computed at preparation."""
        frames = record["clip_frames"][shot]
        if frame not in frames:
            raise ValueError(f"{self.folder}: frame {frame} of a shot has no prepared CLIP feature (prepared "
                             f"for {self.settings['strategy']} budget {self.settings['budget']}); prepare again "
                             "with this context setting")
        return self.tensor(record, f"shot{shot}/clip")[frames.index(frame)]

    def context_frame(self, record: dict, shot: int, frame: int) -> torch.Tensor:
        """[C, h, w] latents of one context frame: a latent frame of the shot, or (Wan) the frame
        encoded on its own at preparation."""
        if self.settings["context"]["frames"] == "shot":
            return self.tensor(record, f"shot{shot}/latents")[:, frame]
        frames = record["context_frames"][shot]
        if frame not in frames:
            raise ValueError(f"{self.folder}: frame {frame} of a shot was not prepared as a context "
                             f"frame (prepared for {self.settings['strategy']} budget "
                             f"{self.settings['budget']}); prepare again with this context setting")
        return self.tensor(record, f"shot{shot}/frames")[:, frames.index(frame)]

    def context_pool(self, record: dict) -> list[list[int]]:
        """Per shot of `record`, the frames `context_frame` can read (Wan: those prepared as context frames)."""
        if self.settings["context"]["frames"] == "shot":
            return [list(range(n)) for n in record["shot_frames"]]
        return [list(frames) for frames in record["context_frames"]]

    def references(self, record: dict, shot: int, picks: tuple[int, ...]) -> Context | None:
        """The reference crops `picks` of shot `shot` as the generator places them: shot −1, each with the
        global caption ⊕ its own caption (None: no picks)."""
        if not picks:
            return None
        if self.settings.get("caption_layout") == "joint":
            texts = [self.tensor(record, f"shot{shot}/ref{i}/joint_text") for i in picks]
        else:
            texts = [join_text([self.tensor(record, "global_text"), self.tensor(record, f"shot{shot}/ref{i}/text")],
                               self.text_len) for i in picks]
        latents = torch.stack([self.tensor(record, f"shot{shot}/ref{i}/latents") for i in picks], 1)
        return Context(latents, torch.stack(texts), torch.full((len(picks),), -1, dtype=torch.long))

    def history(self, record: dict, shots: int, strategy: str, budget: int,
                memory: MemoryRule | None = None) -> Context | None:
        """The context of shot `shots` of `record`: picked from its ground-truth shots before it (by
        `memory` for the ranked strategies, scored against shot `shots`' caption)."""
        if strategy in RANKED:
            if memory is None:
                raise ValueError(f"context strategy {strategy!r} needs its memory rule (data.context.similarity)")
            return replace(memory, budget=budget).history(
                record["shot_frames"][:shots], record["captions"][shots], lambda k: record["captions"][k],
                lambda k, f: self.context_frame(record, k, f), lambda k: self.shot_text(record, k),
                feature=(lambda k, f: self.clip_feature(record, k, f)) if "clip_frames" in record else None)
        return pick_context(record["shot_frames"][:shots], strategy, budget,
                            lambda k, f: self.context_frame(record, k, f), lambda k: self.shot_text(record, k))


class ShotDataset:
    """(record, target shot) pairs with context sampled by `strategy` and `budget`; `negative` = (p, frames,
    seed) mixes irrelevant shots into contexts (`data.context.negative`); `limit` keeps only the newest
    `limit` context frames (a student's global cache holds no more than its budget); `references` = (p, max,
    seed) starts contexts with character crops (`data.context.references`), which take budget and limit
    slots from the history."""

    def __init__(self, folder: str | Path, strategy: str, budget: int,
                 negative: tuple[float, int, int] | None = None, limit: int | None = None,
                 references: tuple[float, int, int] | None = None, memory: MemoryRule | None = None) -> None:
        self.data = PreparedData(folder)
        self.memory = memory
        self.strategy, self.budget, self.negative, self.limit = strategy, budget, negative, limit
        self.refs = references
        if references and self.data.settings.get("references", 0) < references[1]:
            raise ValueError(f"{folder}: prepared with {self.data.settings.get('references', 0)} references per "
                             f"sample, data.context.references.max is {references[1]}; prepare again with it")
        self.items = [(r, j) for r, rec in enumerate(self.data.records) for j in range(len(rec["captions"]))]
        if not self.items:
            raise ValueError(f"{folder}: no prepared records")
        self.epoch = 0
        self._pools = [self.data.context_pool(rec) for rec in self.data.records] if negative else None

    def set_epoch(self, epoch: int) -> None:
        """The epoch the negative draws belong to (DataStream calls it before each epoch's batches)."""
        self.epoch = epoch

    def negative_shot(self, i: int) -> NegativeShot | None:
        """The irrelevant shot mixed into item i this epoch, or None."""
        if self.negative is None:
            return None
        p, frames, seed = self.negative
        r, target = self.items[i]
        return pick_negative(self._pools, r, target, p, frames, seed, self.epoch, i)

    def reference_picks(self, i: int) -> tuple[int, ...]:
        """Which crops of its target shot item i starts its context with this epoch (() for none)."""
        if self.refs is None:
            return ()
        p, most, seed = self.refs
        r, target = self.items[i]
        available = len(self.data.records[r]["references"][target])
        slots = self.budget if self.limit is None else min(self.budget, self.limit)
        return pick_references(available, p, most, slots, seed, self.epoch, i)

    def __len__(self) -> int:
        return len(self.items)

    def _history_frames(self, lengths: list[int], budget: int) -> int:
        """How many context frames the rule picks from a history of shots of `lengths` frames."""
        if self.memory is None:
            return len(sample_context(lengths, self.strategy, budget))
        s, factor = self.data.settings, self.data.settings["codec"]["spatial_factor"]
        count = len(replace(self.memory, budget=budget).candidates(lengths))
        return replace(self.memory, budget=budget).frames(count, s["height"] // factor, s["width"] // factor)

    def group(self, i: int) -> tuple[int, int]:
        """Items of one group have the same context and target lengths, so they stack into a batch."""
        r, target = self.items[i]
        rec = self.data.records[r]
        refs = len(self.reference_picks(i))
        picks = self._history_frames(rec["shot_frames"][:target], self.budget - refs)
        negative = self.negative_shot(i)
        frames = picks + (0 if negative is None else len(negative.frames))
        return refs + (frames if self.limit is None else min(frames, self.limit - refs)), rec["latent_frames"][target]

    def __getitem__(self, i: int) -> dict:
        r, target = self.items[i]
        rec, data = self.data.records[r], self.data
        latents = data.tensor(rec, f"shot{target}/latents")
        text = data.shot_text(rec, target)
        refs = self.reference_picks(i)
        context = data.history(rec, target, self.strategy, self.budget - len(refs), self.memory)
        negative = self.negative_shot(i)
        if negative is not None:
            other = data.records[negative.record]
            extra = Context(torch.stack([data.context_frame(other, negative.shot, f) for f in negative.frames], 1),
                            data.shot_text(other, negative.shot).expand(len(negative.frames), -1, -1),
                            torch.zeros(len(negative.frames), dtype=torch.long))
            context = insert_shot(context, extra, negative.place)
        # rules that ignore the budget (first, first_last) may pick more than the global cache holds
        if context is not None and self.limit is not None and context.frames > self.limit - len(refs):
            keep = slice(context.frames - (self.limit - len(refs)), None)
            context = Context(context.latents[:, keep], context.texts[keep], context.shots[keep])
        context = Context.cat([data.references(rec, target, refs), context]) or Context.empty_like(latents, text)
        return {"latents": latents, "text": text, "context": context, "target_shot": torch.tensor(target),
                "record": rec["id"]}


class PromptDataset:
    """Caption-only multi-shot prompts; with `shots`, records with fewer shots are left out and
    longer ones keep their first `shots` (so prompts stack into batches)."""

    def __init__(self, folder: str | Path, shots: int | None = None) -> None:
        self.data = PreparedData(folder)
        self.shots = shots
        self.records = [r for r in self.data.records if shots is None or len(r["captions"]) >= shots]
        if not self.records:
            raise ValueError(f"{folder}: no prepared record has {shots} shots")

    def __len__(self) -> int:
        return len(self.records)

    def group(self, i: int) -> int:
        return self.shots or len(self.records[i]["captions"])

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        count = self.group(i)
        return {"texts": torch.stack([self.data.shot_text(rec, s) for s in range(count)]),
                "captions": rec["captions"][:count], "global_caption": rec["global_caption"],
                "facts": rec["facts"], "record": rec["id"]}
