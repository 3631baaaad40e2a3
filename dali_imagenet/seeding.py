"""Every random stream of a run derived from the run's seed and a named purpose, in one place.

A stream that depends only on (seed, purpose, epoch or step, rank) needs no saved state to be
resumed exactly, and two purposes never share a stream by accident of arithmetic.
"""
from __future__ import annotations

import zlib

import numpy as np

_PURPOSES = ("shard order", "loader", "mixing", "torch")


def derive_seed(seed: int, purpose: str, *counters: int) -> int:
    """A 31-bit seed for `purpose` at the given counters (epoch, step, rank, ...)."""
    if purpose not in _PURPOSES:
        raise ValueError(f"unknown seed purpose {purpose!r}")
    words = [seed & 0xFFFFFFFF, zlib.crc32(purpose.encode()), *(c & 0xFFFFFFFF for c in counters)]
    return int(np.random.SeedSequence(words).generate_state(1)[0] >> 1)


def permutation(seed: int, purpose: str, count: int, *counters: int) -> list[int]:
    return np.random.default_rng(derive_seed(seed, purpose, *counters)).permutation(count).tolist()
