"""distill/seeds.py derive_seed: stable, independent streams per (run seed, purpose, index)."""

from __future__ import annotations

import pytest
import torch

from distill.seeds import derive_seed


def test_seeds_are_stable_across_processes_and_versions():
    # pinned values: a change here changes every derived stream (and breaks bit-identity)
    assert derive_seed(0, "ode-noise", 0) == 3573219376678811849
    assert derive_seed(1234, "rollout", 7) == 5954483489417277789


def test_purposes_indices_and_run_seeds_give_different_streams():
    seeds = {derive_seed(s, p, i) for s in (0, 1) for p in ("ode-noise", "rollout", "eval") for i in range(50)}
    assert len(seeds) == 2 * 3 * 50
    assert all(0 <= s < 2 ** 63 for s in seeds)
    draws = [torch.randn(8, generator=torch.Generator().manual_seed(derive_seed(0, p, 0)))
             for p in ("ode-noise", "rollout")]
    assert not torch.equal(*draws)
    again = torch.randn(8, generator=torch.Generator().manual_seed(derive_seed(0, "ode-noise", 0)))
    assert torch.equal(draws[0], again)


def test_no_two_triples_share_a_key():
    assert derive_seed(1, "a", 23) != derive_seed(12, "a", 3)
    assert derive_seed(0, "a,1", 2) != derive_seed(0, "a", 12)


@pytest.mark.parametrize("args", [(0.5, "x", 0), (0, "x", True), (0, "", 0), (0, 3, 0)])
def test_bad_arguments(args):
    with pytest.raises((TypeError, ValueError)):
        derive_seed(*args)
