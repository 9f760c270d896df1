"""Counter-based random numbers shared by every backend.

Each right-hand side gets one 64-bit seed drawn from the caller's ``rng`` before any
kernel runs. A uniform number is a pure function of (seed, sample, level):
``u = splitmix64(seed + splitmix64(sample * n + level + 1)) >> 11`` scaled to [0, 1).
numpy, numba and CUDA evaluate the same integer arithmetic, so a seed gives the same
samples on every backend and for every thread count.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_INV53 = float(2.0**-53)


def splitmix64(z):
    """SplitMix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = np.asarray(z, dtype=np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def uniform(seeds, sample, level, n):
    """Uniform [0, 1) doubles for ``seeds`` (uint64 array) at (sample, level) of an n-level problem."""
    with np.errstate(over="ignore"):
        ctr = np.uint64(sample) * np.uint64(n) + np.uint64(level) + np.uint64(1)
        h = splitmix64(np.asarray(seeds, dtype=np.uint64) + splitmix64(ctr))
    return (h >> np.uint64(11)).astype(np.float64) * _INV53


def column_seeds(rng, k: int) -> np.ndarray:
    """One uint64 seed per RHS column from ``rng`` (None, int, or numpy Generator)."""
    gen = np.random.default_rng(rng)
    return gen.integers(0, np.iinfo(np.int64).max, size=k, dtype=np.int64).astype(np.uint64)
