r"""Fused whole-array passes of the driver: every check and reduction of one array in a
single read (validation, output checks) and the reordering of results.

Validation of a 4096 x 4096 problem in numpy makes a dozen passes over (n, n) and (n, k)
arrays (``isfinite`` and its boolean temporary, ``tril`` slabs, min and max reductions,
``abs`` temporaries for mixed signs, ...): 0.1-0.3 s against a 0.3 s solve. The kernels
here read each array once, in parallel, with no temporaries of its size, and return what
:mod:`bils._validate` and :func:`bils._guard.level_weights_iv` need:

* :func:`matrix_stats` — for the triangular factor ``R`` (n, n): whether an entry is
  non-finite, whether an entry below the diagonal is non-zero, and
  :math:`\max_i \sum_l |R_{il}|`;
* :func:`array_stats` — for ``Y`` and the grid values ``V`` (g, k): whether an entry is
  non-finite, per row :math:`\min_j |V_{ij}|`, :math:`\max_j |V_{ij}|` and per column
  :math:`\max_i |V_{ij}|`;
* :func:`codes_in_box` — whether every code lies in its box (the output check);
* :func:`scatter_rows` — ``out[perm] = x`` (codes back to the caller's order), rows
  copied in parallel.

Non-finite entries are detected through ``v - v`` (NaN for NaN and ±inf, 0 otherwise)
summed per row or column block, so the loops stay branch-free and vectorise. Sums are
sequential per row (numpy sums pairwise): bounds computed from them may differ from
numpy's in the last bits, which only moves a safety bound by a relative ~1e-13.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["matrix_stats", "array_stats", "codes_in_box", "scatter_rows"]

#: Columns per parallel task of :func:`array_stats`.
_COLS = 256


@njit(cache=True, parallel=True)
def _matrix_rows(R, rowsum, flags):
    n = R.shape[0]
    for i in prange(n):
        row = R[i]
        s = 0.0
        bad = 0.0
        for j in range(row.shape[0]):
            v = row[j]
            s += abs(v)
            bad += v - v
        low = 0
        for j in range(min(i, row.shape[0])):
            low += row[j] != 0.0
        rowsum[i] = s
        flags[i] = (1 if bad != 0.0 else 0) + (2 if low > 0 else 0)


def matrix_stats(R):
    """``(non_finite, lower_nonzero, max_row_abs_sum)`` of a square C-contiguous float64 ``R``."""
    n = R.shape[0]
    rowsum = np.empty(n)
    flags = np.empty(n, dtype=np.int8)
    _matrix_rows(R, rowsum, flags)
    non_finite = bool(np.any(flags & 1))
    lower = bool(np.any(flags & 2))
    return non_finite, lower, (float(rowsum.max()) if not non_finite else np.nan)


@njit(cache=True, parallel=True)
def _array_blocks(V, rows, width, rmin, rmax, cmax, bad):
    g, k = V.shape
    nb = rmin.shape[0]
    for b in prange(nb):
        j0 = b * width
        j1 = min(k, j0 + width)
        acc = 0.0
        for j in range(j0, j1):
            cmax[j] = 0.0
        for i in range(g):
            row = V[i]
            lo = np.inf
            hi = 0.0
            for j in range(j0, j1):
                v = row[j]
                a = abs(v)
                acc += v - v
                c = cmax[j]
                cmax[j] = a if a > c else c
                if rows:
                    lo = a if a < lo else lo
                    hi = a if a > hi else hi
            if rows:
                rmin[b, i] = lo
                rmax[b, i] = hi
        bad[b] = acc != 0.0


def array_stats(V, rows=True):
    """``(non_finite, row_abs_min, row_abs_max, col_abs_max)`` of a C-contiguous float64 ``V`` (g, k).

    With ``rows=False`` the row reductions are skipped (returned as None).
    """
    g, k = V.shape
    nb = -(-k // _COLS)
    rmin = np.empty((nb, g) if rows else (nb, 0))
    rmax = np.empty_like(rmin)
    cmax = np.empty(k)
    bad = np.empty(nb, dtype=np.bool_)
    _array_blocks(V, rows, _COLS, rmin, rmax, cmax, bad)
    if not rows:
        return bool(bad.any()), None, None, cmax
    return bool(bad.any()), rmin.min(axis=0), rmax.max(axis=0), cmax


@njit(cache=True)
def _box_row(xrow, lorow, hirow):
    """Codes of one row outside the box (bound rows of length k or 1)."""
    cnt = 0
    if lorow.shape[0] == 1 and hirow.shape[0] == 1:
        lo = lorow[0]
        hi = hirow[0]
        for j in range(xrow.shape[0]):
            v = xrow[j]
            cnt += (v < lo) | (v > hi)
    else:
        for j in range(xrow.shape[0]):
            v = xrow[j]
            lo = lorow[j if lorow.shape[0] > 1 else 0]
            hi = hirow[j if hirow.shape[0] > 1 else 0]
            cnt += (v < lo) | (v > hi)
    return cnt


@njit(cache=True, parallel=True)
def _box_rows(x, LO, HI, out):
    n = x.shape[0]
    for i in prange(n):
        ii = np.int64(i)  # (the parallel index is unsigned: min with a signed int is a float)
        out[ii] = _box_row(x[ii], LO[min(ii, LO.shape[0] - 1)], HI[min(ii, HI.shape[0] - 1)])


def codes_in_box(x, LO, HI):
    """Whether every code of ``x`` (n, k) int64 C-contiguous lies in ``[LO, HI]`` (compact
    int64 bounds of shape (n or 1, k or 1))."""
    out = np.empty(x.shape[0], dtype=np.int64)
    _box_rows(x, LO, HI, out)
    return not bool(out.any())


@njit(cache=True, parallel=True)
def _scatter(x, perm, out):
    for q in prange(x.shape[0]):
        qq = np.int64(q)
        src = x[qq]
        dst = out[perm[qq]]
        for j in range(src.shape[0]):
            dst[j] = src[j]


def scatter_rows(x, perm):
    """``out`` with ``out[perm[q]] = x[q]`` for ``x`` (n, k) C-contiguous, ``perm`` a
    permutation of ``range(n)``."""
    out = np.empty_like(x)
    _scatter(x, np.ascontiguousarray(perm, dtype=np.int64), out)
    return out
