"""The one split of evaluation items over ranks: every rank runs the same number of items.

Under ZeRO-3 every forward gathers the model's parameters collectively, so a rank that runs fewer
forwards than the others leaves them waiting for it until the job times out. Items go round-robin
(rank r takes r, r + world, r + 2·world, ...) for ceil(count / world) rounds; a rank whose last round
falls past the end takes item (i mod count) again with weight 0: it runs the same forwards and adds
nothing to the sums. Every probe and the scoring loop split their items with `rank_share`.
"""

from __future__ import annotations


def rank_share(count: int, rank: int, world: int) -> list[tuple[int, float]]:
    """(item index, weight) of this rank's items out of `count`: weight 1.0 for its own items, 0.0 for
    the padding; every rank gets the same number (none when count is 0)."""
    if count <= 0:
        return []
    rounds = -(-count // world)
    return [(i % count, float(i < count)) for i in (rank + j * world for j in range(rounds))]
