"""Context-frame sampling (teacher/context.py): the ShotStream dynamic rule and the ablation strategies."""

import pytest

from teacher.context import candidate_frames, evenly_spaced, frames_per_shot, sample_context

# S_hist → frames per history shot (budget 6) and the picks with 12-frame shots
DYNAMIC_6 = [
    (1, [6], [(0, 0), (0, 2), (0, 4), (0, 7), (0, 9), (0, 11)]),
    (2, [3, 3], [(0, 0), (0, 6), (0, 11), (1, 0), (1, 6), (1, 11)]),
    (3, [2, 2, 2], [(0, 0), (0, 11), (1, 0), (1, 11), (2, 0), (2, 11)]),
    (4, [1, 1, 1, 3], [(0, 0), (1, 0), (2, 0), (3, 0), (3, 6), (3, 11)]),
    (5, [1, 1, 1, 1, 2], [(0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (4, 11)]),
]


@pytest.mark.parametrize("history,counts,picks", DYNAMIC_6)
def test_dynamic_budget_6_table(history, counts, picks):
    assert frames_per_shot(history, "dynamic", 6) == counts
    assert sample_context([12] * history, "dynamic", 6) == picks


def test_more_history_than_budget_keeps_only_the_most_recent_shot():
    assert frames_per_shot(8, "dynamic", 6) == [0] * 7 + [6]


def test_first_and_first_last_ignore_the_budget():
    assert sample_context([12, 8, 5], "first", 1) == [(0, 0), (1, 0), (2, 0)]
    assert sample_context([12, 8], "first_last", 0) == [(0, 0), (0, 11), (1, 0), (1, 7)]


def test_evenly_spaced_includes_both_ends_and_rounds_halves_up():
    assert evenly_spaced(12, 6) == [0, 2, 4, 7, 9, 11]   # 0, 2.2, 4.4, 6.6, 8.8, 11
    assert evenly_spaced(13, 3) == [0, 6, 12]
    assert evenly_spaced(4, 3) == [0, 2, 3]              # 1.5 rounds up
    assert evenly_spaced(9, 1) == [0]
    assert evenly_spaced(3, 6) == [0, 1, 2]              # a short shot gives all it has
    assert sample_context([3], "dynamic", 6) == [(0, 0), (0, 1), (0, 2)]


def test_no_history_no_context():
    assert sample_context([], "dynamic", 6) == []


def test_candidates_cover_every_history_length():
    cands = candidate_frames(81, "dynamic", 6)
    for history in range(1, 12):
        for _, frame in sample_context([81] * history, "dynamic", 6):
            assert frame in cands
    assert candidate_frames(81, "first_last", 6) == [0, 80]
    assert candidate_frames(12, "dynamic", 6) == sorted({0, 11, 6, 2, 4, 7, 9})


def test_bad_strategy_and_budget():
    with pytest.raises(ValueError, match="unknown context strategy 'last'"):
        sample_context([12], "last", 6)
    with pytest.raises(ValueError, match="budget must be >= 0"):
        sample_context([12], "dynamic", -1)
