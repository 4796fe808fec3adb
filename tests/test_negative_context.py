"""Protects negative context (FilmWeaver): the mixing rate is p, the frames come from another record, never
the sample's own, are placed as one extra history shot, and the draws are pure in (seed, epoch, sample)."""

from __future__ import annotations

import math

import pytest
import torch

from distill.data.datasets import ShotDataset
from distill.data.negatives import check_negative, insert_shot, pick_negative
from distill.data.stream import DataStream
from student.context import Context
from helpers import assert_stream_resumes, make_prepared

# 40 records of 1-4 shots of 3-8 frames: the frames each shot can give as context
POOLS = [[list(range(3 + (r + k) % 6)) for k in range(1 + r % 4)] for r in range(40)]


def _draws(p, seed=0, epoch=0, n=4000, frames=2):
    return [pick_negative(POOLS, i % 40, (i % 40) % 4, p, frames, seed, epoch, i) for i in range(n)]


@pytest.mark.parametrize("p", [0.1, 0.3, 0.7])
def test_the_mixing_rate_is_p(p):
    n = 4000
    mixed = sum(d is not None for d in _draws(p, n=n))
    assert abs(mixed / n - p) < 4 * math.sqrt(p * (1 - p) / n)  # 4 binomial standard deviations
    assert not any(_draws(0.0, n=200)) and all(_draws(1.0, n=200))


def test_the_frames_come_from_another_record_never_the_samples_own():
    draws = _draws(1.0, n=2000)
    assert all(d.record != i % 40 for i, d in enumerate(draws))
    assert len({d.record for d in draws}) == 40  # every other record can be drawn
    for i, d in enumerate(draws):
        assert 0 <= d.shot < len(POOLS[d.record]) and set(d.frames) <= set(POOLS[d.record][d.shot])
        assert len(d.frames) == min(2, len(POOLS[d.record][d.shot])) and 0 <= d.place <= (i % 40) % 4


def test_draws_are_pure_in_seed_epoch_and_sample():
    assert _draws(0.5, seed=3, epoch=1) == _draws(0.5, seed=3, epoch=1)
    assert _draws(0.5, seed=3, epoch=1) != _draws(0.5, seed=3, epoch=2)
    assert _draws(0.5, seed=3) != _draws(0.5, seed=4)
    assert pick_negative(POOLS[:1], 0, 0, 1.0, 2, 0, 0, 0) is None  # no other record to draw from


def test_the_shot_is_inserted_in_time_order_and_later_shots_renumbered():
    history = Context(torch.arange(4.0).view(1, 4, 1, 1).expand(2, 4, 1, 1), torch.arange(4.0).view(4, 1, 1),
                      torch.tensor([0, 0, 1, 2]))
    extra = Context(torch.full((2, 2, 1, 1), 9.0), torch.full((2, 1, 1), 9.0), torch.zeros(2, dtype=torch.long))
    mixed = insert_shot(history, extra, 1)
    assert mixed.latents[0, :, 0, 0].tolist() == [0.0, 1.0, 9.0, 9.0, 2.0, 3.0]
    assert mixed.texts.flatten().tolist() == [0.0, 1.0, 9.0, 9.0, 2.0, 3.0]
    assert mixed.shots.tolist() == [0, 0, 1, 1, 2, 3]
    assert insert_shot(history, extra, 3).shots.tolist() == [0, 0, 1, 2, 3, 3]
    assert insert_shot(None, extra, 0).shots.tolist() == [0, 0]


@pytest.mark.parametrize("p, frames, key", [(1.5, 1, "data.context.negative.p"), (0.5, 0, "data.context.negative.frames")])
def test_bad_keys_are_named(p, frames, key):
    with pytest.raises(ValueError, match=rf"^{key} must be"):
        check_negative(p, frames)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("neg"))


def test_a_mixed_sample_holds_the_other_records_frames_and_text(folder):
    plain = ShotDataset(folder, "dynamic", 3)
    mixed = ShotDataset(folder, "dynamic", 3, negative=(1.0, 2, 7))
    data = mixed.data
    for i in range(len(mixed)):
        r, target = mixed.items[i]
        neg = mixed.negative_shot(i)
        item, base = mixed[i], plain[i]
        other = data.records[neg.record]
        assert other["id"] != data.records[r]["id"]
        own = base["context"]
        at = int((own.shots < neg.place).sum())
        want = torch.stack([data.context_frame(other, neg.shot, f) for f in neg.frames], 1)
        got = item["context"]
        assert got.frames == own.frames + len(neg.frames) == mixed.group(i)[0]
        assert torch.equal(got.latents[:, at:at + len(neg.frames)], want)
        assert torch.equal(got.texts[at], data.shot_text(other, neg.shot))
        assert torch.equal(torch.cat([got.latents[:, :at], got.latents[:, at + len(neg.frames):]], 1), own.latents)
        assert torch.equal(item["latents"], base["latents"])
    limited = ShotDataset(folder, "dynamic", 3, negative=(1.0, 2, 7), limit=3)
    assert all(limited[i]["context"].frames == limited.group(i)[0] <= 3 for i in range(len(limited)))


def test_a_stream_mixes_the_same_after_resume_and_anew_each_epoch(folder):
    def stream():
        return DataStream(ShotDataset(folder, "dynamic", 3, negative=(0.5, 1, 7)), 1, seed=7)

    def same(got, want):
        assert got["record"] == want["record"] and torch.equal(got["context"].latents, want["context"].latents)

    assert_stream_resumes(stream, same)
    dataset = stream().dataset
    n = len(dataset)
    picks = lambda e: [dataset.negative_shot(i) for i in range(n)] if not dataset.set_epoch(e) else None  # noqa: E731
    assert picks(0) != picks(1)


def test_a_limit_caps_rules_that_ignore_the_budget(folder):
    """first_last picks two frames per history shot whatever the budget: with a limit (the student's
    global cache: ODE pairs, DMD) only the newest `limit` stay, and the group says so."""
    free = ShotDataset(folder, "first_last", 3)
    capped = ShotDataset(folder, "first_last", 3, limit=3)
    deep = [i for i in range(len(free)) if free[i]["context"].frames > 3]
    assert deep, "the world needs histories of 2+ shots"
    for i in deep:
        got, full = capped[i]["context"], free[i]["context"]
        assert got.frames == 3 == capped.group(i)[0]
        assert torch.equal(got.latents, full.latents[:, -3:]) and torch.equal(got.shots, full.shots[-3:])
