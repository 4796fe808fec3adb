"""distill/logging.py log_once: a handful of scalars written once, rank 0 only."""

from __future__ import annotations

from distill.logging import log_once, read_scalars


def test_log_once_writes_replaces_and_purges_later_points(tmp_path):
    tb = tmp_path / "tb"
    log_once(tb, "stage", 3, {"a": 1.0}, main=True)
    log_once(tb, "stage", 5, {"a": 2.0}, main=True)
    assert read_scalars(tb, "stage/a") == {3: 1.0, 5: 2.0}
    log_once(tb, "stage", 5, {"a": 4.0}, main=True, replace=True)     # a re-evaluation
    assert read_scalars(tb, "stage/a") == {3: 1.0, 5: 4.0}
    log_once(tb, "stage", 4, {"a": 3.0}, main=True)                   # later points are dropped
    assert read_scalars(tb, "stage/a") == {3: 1.0, 4: 3.0}


def test_log_once_is_a_no_op_off_rank_0_or_when_disabled(tmp_path):
    log_once(tmp_path / "a", "stage", 1, {"a": 1.0}, main=False)
    log_once(tmp_path / "b", "stage", 1, {"a": 1.0}, main=True, enabled=False)
    assert not list(tmp_path.iterdir())
