"""Helpers shared by the numba kernels: compact grids, tie rule, counter RNG.

Bounds (``lo``, ``hi``) arrive as read-only broadcast views of shape (n, k), often with
zero strides. They are never materialised: :func:`compact` returns the smallest
C-contiguous array of shape (n or 1, k or 1) holding the distinct values, and kernels read
it through :func:`at`. ``scale`` and ``offset`` arrive as grouped grids (values (g, k or 1)
and a group map (n,)) and are read through :func:`gat`, never expanded to (n, k). Every array handed to a kernel has a fixed numba type
(C-contiguous, read-only inputs), so each kernel compiles once.
"""

from __future__ import annotations

import time

import numpy as np
from numba import njit

__all__ = ["ALIGN", "aligned_empty", "Clock", "compact", "readonly", "grids", "at", "gat", "box_round", "uniform", "splitmix64", "TILE"]

#: Byte alignment of the kernels' per-task scratch tiles (a cache line; see :func:`aligned_empty`).
ALIGN = 64

#: Right-hand sides per parallel task (one ``prange`` iteration): sized so a task's
#: working tile (levels x TILE doubles) stays in the core's L1/L2 cache.
TILE = 32


def readonly(a):
    """A read-only view of ``a`` (no copy)."""
    v = a.view()
    v.flags.writeable = False
    return v


def compact(a, dtype):
    """Smallest C-contiguous (n or 1, k or 1) array equal to the broadcast view ``a``."""
    a = np.asarray(a)
    index = tuple(slice(0, 1) if (st == 0 or sh == 1) else slice(None)
                  for st, sh in zip(a.strides, a.shape))
    return readonly(np.ascontiguousarray(a[index], dtype=dtype))


def grids(can, dtype=np.float64):
    """``(S, Sg, O, Og, lo, hi)`` of a :class:`~bils._validate.Canonical` for the kernels.

    ``scale`` and ``offset`` as grouped grids: values ``S``, ``O`` (g, k or 1) C-contiguous
    in ``dtype`` (float64, or float32 for the single-precision Babai path) and group maps
    ``Sg``, ``Og`` (n,) int64, read through :func:`gat`; bounds compact int64, read
    through :func:`at`.
    """
    out = []
    for grid in (can.scale, can.offset):
        out.append(readonly(np.ascontiguousarray(grid.values, dtype=dtype)))
        out.append(readonly(np.ascontiguousarray(grid.groups, dtype=np.int64)))
    return (*out, compact(can.lo, np.int64), compact(can.hi, np.int64))


class Clock:
    """Accumulates wall time per phase into ``timings`` (a dict) when one is given.

    Phases of the Babai kernel (panel method): ``grid`` (compact grids), ``convert`` (precision
    conversions and transposed copies of ``R``'s panels), ``product`` (BLAS products
    between panels), ``panel`` (the in-panel sweep kernels), ``assemble`` (allocating and
    assembling the result).
    """

    #: The clock read (wall time; ``time.process_time`` gives CPU time on a busy machine).
    now = staticmethod(time.perf_counter)

    def __init__(self, timings):
        self.timings = timings
        self.t = self.now() if timings is not None else 0.0

    def restart(self):
        if self.timings is not None:
            self.t = self.now()

    def lap(self, phase):
        if self.timings is not None:
            now = self.now()
            self.timings[phase] = self.timings.get(phase, 0.0) + (now - self.t)
            self.t = now


@njit(cache=True, inline="always")
def aligned_empty(rows, cols, proto):
    """Uninitialised (rows, cols) C-contiguous scratch in ``proto``'s dtype, its first element
    on a 64-byte (:data:`ALIGN`) boundary.

    ``np.empty`` inside a kernel returns 32-byte aligned memory whose offset within a cache
    line depends on the allocator's state (measured: in one parallel launch one thread's
    tiles started at 32 mod 64, the other's at 0). A tile row of 64 (float64) or 128
    (float32) values is a multiple of 64 bytes, so with an aligned start no 512-bit load
    or store of the fused row updates crosses a cache line; with a start at 32 mod 64
    every one does, and the Babai sweep took 17 % (float32) to 23 % (float64) more CPU
    time (AMD Zen 5, 4096 levels, one thread, interleaved runs), in whichever thread
    drew the misaligned tiles: a variation between calls that no benchmark repeat can
    control.
    """
    size = proto.itemsize
    buf = np.empty(rows * cols + ALIGN // size, dtype=proto.dtype)
    off = ((ALIGN - buf.ctypes.data % ALIGN) % ALIGN) // size
    return buf[off:off + rows * cols].reshape((rows, cols))


@njit(cache=True, inline="always")
def at(A, i, j):
    """``A[i, j]`` of a compact grid (a length-1 axis broadcasts)."""
    ii = np.int64(i) if A.shape[0] > 1 else np.int64(0)
    jj = np.int64(j) if A.shape[1] > 1 else np.int64(0)
    return A[ii, jj]


@njit(cache=True, inline="always")
def gat(V, G, i, j):
    """Entry ``(i, j)`` of a grouped grid: ``V[G[i], j]`` (a length-1 RHS axis broadcasts)."""
    jj = np.int64(j) if V.shape[1] > 1 else np.int64(0)
    return V[G[i], jj]


@njit(cache=True, inline="always")
def box_round(c, lo, hi):
    """The tie rule used everywhere: ``clip(floor(c + 0.5), lo, hi)`` (as float)."""
    x = np.floor(c + 0.5)
    flo = np.float64(lo)
    fhi = np.float64(hi)
    if x < flo:
        x = flo
    elif x > fhi:
        x = fhi
    return x


from .._rng import GOLDEN as _GOLDEN, INV53 as _INV53, M1 as _M1, M2 as _M2  # noqa: E402
from .._rng import ONE as _ONE, S11 as _S11, S27 as _S27, S30 as _S30, S31 as _S31  # noqa: E402


@njit(cache=True, inline="always")
def splitmix64(z):
    """SplitMix64 finaliser on a uint64 (wrapping), as :func:`bils._rng.splitmix64`."""
    z = np.uint64(z + _GOLDEN)
    z = np.uint64((z ^ (z >> _S30)) * _M1)
    z = np.uint64((z ^ (z >> _S27)) * _M2)
    return np.uint64(z ^ (z >> _S31))


@njit(cache=True, inline="always")
def uniform(seed, sample, level, n):
    """Uniform [0, 1) double of :func:`bils._rng.uniform` for one seed (same integers)."""
    ctr = np.uint64(np.uint64(sample) * np.uint64(n) + np.uint64(level) + _ONE)
    h = splitmix64(np.uint64(seed + splitmix64(ctr)))
    return np.float64(h >> _S11) * _INV53
