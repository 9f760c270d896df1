"""CUDA Schnorr–Euchner enumeration: one thread per RHS with an explicit stack.

The search of :func:`bils._numba.enumerate._se_single` (box-aware zig-zag, radius
shrinking, an ``n_best`` list kept sorted with stable insertion, the node budget) run by
one thread per right-hand side. The stack is the per-level state in local memory (the
current value ``x_i``, the centre ``c_i``, the next unvisited candidates below and above,
and the partial cost of the levels above); the ``n_best`` list lives in the output arrays
of the thread's column. Node counts, budget handling and tie rules are those of the numpy
reference. ``n`` is at most :data:`~bils._cuda._common.NMAX` (local-memory stack).
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from ..result import Status
from ._common import NMAX, at, grids, launch, to_device, xp_module

__all__ = ["enumerate_kernel", "search_kernel"]

_OPTIMAL = np.int8(Status.OPTIMAL)
_BUDGET = np.int8(Status.BUDGET_EXHAUSTED)
_KERNEL = []
_NMAX1 = NMAX + 1  # a constant for the local-array shape


@cuda.jit(device=True, inline=True)
def _centre(R, y, s, x, i, n, d):
    t = y[i]
    for j in range(i + 1, n):
        t -= R[i, j] * s[j] * x[j]
    return t / d[i]


@cuda.jit(device=True, inline=True)
def _first(c, x, nlo, nhi, lo, hi, i):
    m = np.float64(math.floor(c[i] + 0.5))
    if m < np.float64(lo[i]):
        v = lo[i]
    elif m > np.float64(hi[i]):
        v = hi[i]
    else:
        v = np.int64(m)
    x[i] = v
    nlo[i] = v - 1
    nhi[i] = v + 1


@cuda.jit(device=True, inline=True)
def _advance(c, x, nlo, nhi, lo, hi, i):
    """Next candidate of level ``i`` by distance to the centre; False when exhausted."""
    a = nlo[i]
    b = nhi[i]
    a_ok = a >= lo[i]
    b_ok = b <= hi[i]
    if not a_ok and not b_ok:
        return False
    ci = c[i]
    if a_ok and ((not b_ok) or ci - a <= b - ci):
        x[i] = a
        nlo[i] = a - 1
    else:
        x[i] = b
        nhi[i] = b + 1
    return True


def search_kernel():
    """The search kernel ``(R, Yo, S, LO, HI, max_nodes, X, cost, status, nodes, best_x,
    best_cost)``: one thread per RHS; ``best_cost`` (m, k) preset to inf, ``best_x``
    (m, n, k) to 0."""
    if _KERNEL:
        return _KERNEL[0]

    @cuda.jit
    def kern(R, Yo, S, LO, HI, max_nodes, X, cost, status, nodes, best_x, best_cost):
        j = cuda.grid(1)
        if j >= Yo.shape[1]:
            return
        n = R.shape[0]
        m_best = best_cost.shape[0]
        y = cuda.local.array(NMAX, np.float64)
        s = cuda.local.array(NMAX, np.float64)
        d = cuda.local.array(NMAX, np.float64)
        c = cuda.local.array(NMAX, np.float64)
        partial = cuda.local.array(_NMAX1, np.float64)
        lo = cuda.local.array(NMAX, np.int64)
        hi = cuda.local.array(NMAX, np.int64)
        x = cuda.local.array(NMAX, np.int64)
        nlo = cuda.local.array(NMAX, np.int64)
        nhi = cuda.local.array(NMAX, np.int64)
        for i in range(n):
            y[i] = Yo[i, j]
            s[i] = at(S, i, j)
            lo[i] = at(LO, i, j)
            hi[i] = at(HI, i, j)
            x[i] = 0
            d[i] = R[i, i] * s[i]
        partial[n] = 0.0
        count = 0
        beta = np.inf
        nd = 0
        budget_hit = False
        i = n - 1
        c[i] = _centre(R, y, s, x, i, n, d)
        _first(c, x, nlo, nhi, lo, hi, i)
        while True:
            e = d[i] * (c[i] - x[i])
            newdist = partial[i + 1] + e * e
            nd += 1
            if newdist < beta:
                if i > 0:
                    partial[i] = newdist
                    i -= 1
                    c[i] = _centre(R, y, s, x, i, n, d)
                    _first(c, x, nlo, nhi, lo, hi, i)
                    continue
                # leaf: insert after entries of equal cost (stable), drop beyond m_best
                p = count
                while p > 0 and best_cost[p - 1, j] > newdist:
                    p -= 1
                if p < m_best:
                    last = min(count, m_best - 1)
                    for r in range(last, p, -1):
                        best_cost[r, j] = best_cost[r - 1, j]
                        for l in range(n):
                            best_x[r, l, j] = best_x[r - 1, l, j]
                    best_cost[p, j] = newdist
                    for l in range(n):
                        best_x[p, l, j] = x[l]
                    if count < m_best:
                        count += 1
                if count == m_best:
                    beta = best_cost[m_best - 1, j]
                if max_nodes >= 0 and nd >= max_nodes:
                    budget_hit = True
                    break
                if not _advance(c, x, nlo, nhi, lo, hi, 0):
                    i = 1
                    while i < n and not _advance(c, x, nlo, nhi, lo, hi, i):
                        i += 1
                    if i >= n:
                        break
                continue
            if max_nodes >= 0 and nd >= max_nodes and count > 0:
                budget_hit = True
                break
            i += 1
            while i < n and not _advance(c, x, nlo, nhi, lo, hi, i):
                i += 1
            if i >= n:
                break
        for l in range(n):
            X[l, j] = best_x[0, l, j]
        cost[j] = best_cost[0, j]
        status[j] = _BUDGET if budget_hit else _OPTIMAL
        nodes[j] = nd

    _KERNEL.append(kern)
    return kern


def enumerate_kernel(can, *, max_nodes, n_best):
    """CUDA kernel of :func:`bils.enumerate` (same contract as ``_enumerate_numpy``)."""
    xp = xp_module()
    n, k = can.Y.shape
    if n > NMAX:
        raise ValueError(f"backend='cupy' enumerates problems of at most {NMAX} levels, got "
                         f"n = {n}; use backend='numba' or bils.kbest")
    R = to_device(can.R, np.float64)
    Yo = to_device(to_device(can.Y) - R @ to_device(can.dense_grids()[1], np.float64))
    S, _, LO, HI = grids(can)
    x = xp.empty((n, k), dtype=np.int64)
    cost = xp.empty(k)
    status = xp.empty(k, dtype=np.int8)
    nodes = xp.empty(k, dtype=np.int64)
    best_x = xp.zeros((n_best, n, k), dtype=np.int64)
    best_cost = xp.full((n_best, k), np.inf)
    launch(search_kernel(), k, R, Yo, S, LO, HI, int(max_nodes), x, cost, status, nodes, best_x,
           best_cost)
    info = {"nodes": nodes, "max_nodes": max_nodes}
    if n_best > 1:
        info.update(best_x=best_x, best_cost=best_cost)
    return x, cost, status, info
