"""Counter-based random numbers shared by every backend.

Each right-hand side gets one 64-bit seed drawn from the caller's ``rng`` before any
kernel runs. A uniform number is a pure function of (seed, sample, level):
``u = splitmix64(seed + splitmix64(sample * n + level + 1)) >> 11`` scaled to [0, 1).
numpy, numba and CUDA evaluate the same integer arithmetic, so a seed gives the same
samples on every backend and for every thread count.
"""

from __future__ import annotations

import numpy as np

# The constants of SplitMix64 and of the uniform draw, in one place: the numba and CUDA
# kernels (bils._numba._common, bils._cuda._common) import them as compile-time constants.
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
M1 = np.uint64(0xBF58476D1CE4E5B9)
M2 = np.uint64(0x94D049BB133111EB)
S30 = np.uint64(30)
S27 = np.uint64(27)
S31 = np.uint64(31)
S11 = np.uint64(11)
ONE = np.uint64(1)
INV53 = float(2.0**-53)


def splitmix64(z):
    """SplitMix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = np.asarray(z, dtype=np.uint64) + GOLDEN
        z = (z ^ (z >> S30)) * M1
        z = (z ^ (z >> S27)) * M2
        return z ^ (z >> S31)


def uniform(seeds, sample, level, n):
    """Uniform [0, 1) doubles for ``seeds`` (uint64 array) at (sample, level) of an n-level problem."""
    with np.errstate(over="ignore"):
        ctr = np.uint64(sample) * np.uint64(n) + np.uint64(level) + ONE
        h = splitmix64(np.asarray(seeds, dtype=np.uint64) + splitmix64(ctr))
    return (h >> S11).astype(np.float64) * INV53


def column_seeds(rng, k: int) -> np.ndarray:
    """One uint64 seed per RHS column from ``rng`` (None, int, or numpy Generator)."""
    gen = np.random.default_rng(rng)
    return gen.integers(0, np.iinfo(np.int64).max, size=k, dtype=np.int64).astype(np.uint64)
