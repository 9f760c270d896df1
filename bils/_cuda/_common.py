"""Shared pieces of the CUDA kernels: array module, launch sizes, grids, tie rule, RNG.

Grids (``scale``, ``offset``, ``lo``, ``hi``) are passed to kernels in *compact* form: the
smallest C-contiguous array of shape (n or 1, k or 1) equal to the broadcast (n, k) view
(a length-1 axis broadcasts, read through :func:`at`), so a per-row or per-column grid is
never materialised on the device. A dense (n, k) grid is accepted as it is.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
from numba import cuda

from .._backend import cuda_simulator

__all__ = ["LAUNCH", "Launch", "xp_module", "to_device", "compact", "grids", "at", "box_round",
           "splitmix64", "uniform", "blocks", "launch", "record_launches"]


@dataclass
class Launch:
    """Launch sizes of every CUDA kernel, in one place.

    ``threads``: threads per CUDA block (one thread per RHS). ``levels``: levels per
    Babai/Klein block, i.e. per kernel launch and product (at most :data:`MAX_LEVELS`);
    ``sub_levels``: levels per shared-memory sub-block inside a launch (at most
    :data:`SHARED_LEVELS` of the dtype: the whole 128-level block in float32, two
    64-level halves in float64); ``kbest_levels``: levels per K-best panel (at
    most :data:`KBEST_LEVELS`). ``min_blocks``: with few right-hand sides the CUDA blocks
    shrink (down to one warp) until there are at least this many (2 per SM of an
    H100/H200), so that the per-thread sequential work is spread over every SM. Tests shrink them (e.g. ``threads=8, levels=4``) to cross
    block and tile edges on small problems; results depend on them only up to rounding.
    """

    threads: int = 128
    levels: int = 128
    sub_levels: int = 128
    kbest_levels: int = 64
    min_blocks: int = 264


#: The launch sizes used by every kernel (mutable: tests shrink them).
LAUNCH = Launch()

#: Most levels per Babai/Klein launch (the block's decided points live in local memory).
MAX_LEVELS = 128
#: Capacity of a shared-memory sub-block of ``R`` (levels) per working dtype: the packed
#: upper triangle of 128 levels is 33 KiB in float32; in float64 the 128-level block is
#: done as two 64-level sub-blocks (triangle 16.6 KiB, the square coupling them 32 KiB),
#: since 128 levels would need 66 KiB, over the 48 KiB of static shared memory.
SHARED_LEVELS = {np.dtype(np.float32): 128, np.dtype(np.float64): 64}
#: Capacity (levels) of a K-best panel: each thread keeps ``2 * KMAX * KBEST_LEVELS``
#: residuals in local memory.
KBEST_LEVELS = 64
#: Largest beam of the CUDA K-best (survivors live in local memory).
KMAX = 16
#: Largest dimension of the CUDA enumeration (the search state lives in local memory).
NMAX = 64


#: Test hook (:func:`record_launches`): when a list, launches are recorded, not run.
_RECORDER = None


def xp_module():
    """The device array module: cupy, or numpy under the CUDA simulator (or recording)."""
    if cuda_simulator() or _RECORDER is not None:
        return np
    import cupy

    return cupy


def _launchable(a):
    # The simulator copies every kernel argument back to its numpy array after a launch,
    # so read-only views (broadcast grids, read-only inputs) get their own copy there.
    if isinstance(a, np.ndarray) and not a.flags.writeable:
        return a.copy()
    return a


def to_device(a, dtype=None):
    """``a`` as a C-contiguous array of the device module (no copy when already there)."""
    xp = xp_module()
    return _launchable(xp.ascontiguousarray(xp.asarray(a), dtype=dtype))


def compact(a, dtype):
    """Smallest C-contiguous (n or 1, k or 1) device array equal to the broadcast view ``a``."""
    xp = xp_module()
    a = xp.asarray(a)
    index = tuple(slice(0, 1) if (st == 0 or sh == 1) else slice(None)
                  for st, sh in zip(a.strides, a.shape))
    return _launchable(xp.ascontiguousarray(a[index], dtype=dtype))


def grids(can, dtype=np.float64):
    """``(scale, offset, lo, hi)`` of ``can`` in compact form (bounds int64).

    Grouped grids (host problems, :class:`bils.GroupedGrid`) are expanded here by
    :meth:`~bils._validate.Canonical.dense_grids`: the kernels read (n or 1, k or 1) arrays.
    """
    scale, offset = can.dense_grids()
    return (compact(scale, dtype), compact(offset, dtype),
            compact(can.lo, np.int64), compact(can.hi, np.int64))


def blocks(k, threads=None):
    """``(grid, threads per block)`` for ``k`` threads (one per RHS).

    Blocks of ``LAUNCH.threads``, halved (not below a warp of 32) while the grid has fewer
    than ``LAUNCH.min_blocks`` blocks.
    """
    t = LAUNCH.threads if threads is None else threads
    while t > 32 and -(-k // t) < LAUNCH.min_blocks:
        t //= 2
    return max(1, -(-k // t)), t


def launch(kern, n_threads, *args):
    """Launch ``kern`` with one thread per item of ``n_threads`` (blocks of LAUNCH.threads)."""
    if _RECORDER is not None:
        from numba import typeof

        _RECORDER.append((kern, tuple(typeof(a) for a in args)))
        return
    grid, threads = blocks(n_threads)
    kern[grid, threads](*args)


@contextlib.contextmanager
def record_launches():
    """Run the host code with numpy arrays and record ``(kernel, argument types)`` of every
    launch instead of running it (for the PTX compilation checks: the exact launch
    signatures, without a GPU). Outputs of kernels stay uninitialised."""
    global _RECORDER
    saved = _RECORDER
    _RECORDER = []
    try:
        yield _RECORDER
    finally:
        _RECORDER = saved


@cuda.jit(device=True, inline=True)
def at(A, i, j):
    """``A[i, j]`` of a compact grid (a length-1 axis broadcasts)."""
    ii = i if A.shape[0] > 1 else 0
    jj = j if A.shape[1] > 1 else 0
    return A[ii, jj]


@cuda.jit(device=True, inline=True)
def box_round(c, lo, hi):
    """The tie rule used everywhere: ``clip(floor(c + 0.5), lo, hi)`` (as float64)."""
    x = math.floor(np.float64(c) + 0.5)
    flo = np.float64(lo)
    fhi = np.float64(hi)
    if x < flo:
        x = flo
    elif x > fhi:
        x = fhi
    return x


from .._rng import GOLDEN as _GOLDEN, INV53 as _INV53, M1 as _M1, M2 as _M2  # noqa: E402
from .._rng import ONE as _ONE, S11 as _S11, S27 as _S27, S30 as _S30, S31 as _S31  # noqa: E402


@cuda.jit(device=True, inline=True)
def splitmix64(z):
    """SplitMix64 finaliser on a uint64 (wrapping), as :func:`bils._rng.splitmix64`."""
    z = np.uint64(z + _GOLDEN)
    z = np.uint64((z ^ (z >> _S30)) * _M1)
    z = np.uint64((z ^ (z >> _S27)) * _M2)
    return np.uint64(z ^ (z >> _S31))


@cuda.jit(device=True, inline=True)
def uniform(seed, sample, level, n):
    """Uniform [0, 1) double of :func:`bils._rng.uniform` (same integer arithmetic)."""
    ctr = np.uint64(np.uint64(sample) * np.uint64(n) + np.uint64(level) + _ONE)
    h = splitmix64(np.uint64(seed + splitmix64(ctr)))
    return np.float64(h >> _S11) * _INV53
