"""Seed derivation: independent, reproducible random streams from one run seed.

`derive_seed(run_seed, purpose, index)` names a stream by what it is for ("ode-noise", "rollout",
...) and which one (a pair, a rank, a step), so that adding a stream, or drawing more from one,
never shifts another. The value is a hash (SHA-256), not Python's `hash()`: the same on every
process, machine and Python version.
"""

from __future__ import annotations

import hashlib
import json

SEED_BITS = 63  # fits a signed 64-bit int: torch.manual_seed, numpy, Python's random all take it


def derive_seed(seed: int, purpose: str, index: int) -> int:
    """A seed in [0, 2**63) for stream `index` of `purpose` under the run's `seed`."""
    for name, value in (("seed", seed), ("index", index)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"derive_seed: {name} must be an int, got {type(value).__name__}")
    if not isinstance(purpose, str) or not purpose:
        raise ValueError(f"derive_seed: purpose must be a non-empty string, got {purpose!r}")
    key = json.dumps([seed, purpose, index]).encode()        # unambiguous: no two triples share a key
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> (64 - SEED_BITS)
