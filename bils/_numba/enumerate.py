"""Numba Schnorr–Euchner enumeration (box-aware zig-zag, radius shrinking, m-best list).

The search of ``bils.enumeration._se_single`` made iterative with preallocated buffers:
one depth-first search per right-hand side, ``prange`` over right-hand sides with
dynamic scheduling (search sizes vary a lot), each search using only its own scratch.
Node counts, budget handling and tie rules are those of the numpy reference.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from ..result import Status
from ._common import at, gat, grids, readonly

__all__ = ["enumerate_kernel"]

_OPTIMAL = np.int8(Status.OPTIMAL)
_BUDGET = np.int8(Status.BUDGET_EXHAUSTED)


@njit(cache=True)
def _centre(R, y, s, x, i, n, d):
    t = y[i]
    for j in range(i + 1, n):
        t -= R[i, j] * s[j] * x[j]
    return t / d[i]


@njit(cache=True, inline="always")
def _first(c, x, nlo, nhi, lo, hi, i):
    m = np.floor(c[i] + 0.5)
    if m < np.float64(lo[i]):
        v = lo[i]
    elif m > np.float64(hi[i]):
        v = hi[i]
    else:
        v = np.int64(m)
    x[i] = v
    nlo[i] = v - 1
    nhi[i] = v + 1


@njit(cache=True, inline="always")
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


@njit(cache=True)
def _se_single(R, y, s, lo, hi, max_nodes, best_x, best_cost,
               d, x, c, nlo, nhi, partial):
    """One Schnorr–Euchner search; fills ``best_x`` (m, n) / ``best_cost`` (m,) sorted.

    Returns (number of best points found, nodes, finished).
    """
    n = R.shape[0]
    m_best = best_cost.shape[0]
    for i in range(n):
        d[i] = R[i, i] * s[i]
    partial[n] = 0.0
    count = 0
    beta = np.inf
    nodes = 0
    budget_hit = False
    i = n - 1
    c[i] = _centre(R, y, s, x, i, n, d)
    _first(c, x, nlo, nhi, lo, hi, i)
    while True:
        e = d[i] * (c[i] - x[i])
        newdist = partial[i + 1] + e * e
        nodes += 1
        if newdist < beta:
            if i > 0:
                partial[i] = newdist
                i -= 1
                c[i] = _centre(R, y, s, x, i, n, d)
                _first(c, x, nlo, nhi, lo, hi, i)
                continue
            # leaf: insert after entries of equal cost (stable), drop beyond m_best
            p = count
            while p > 0 and best_cost[p - 1] > newdist:
                p -= 1
            if p < m_best:
                last = min(count, m_best - 1)
                for r in range(last, p, -1):
                    best_cost[r] = best_cost[r - 1]
                    for l in range(n):
                        best_x[r, l] = best_x[r - 1, l]
                best_cost[p] = newdist
                for l in range(n):
                    best_x[p, l] = x[l]
                if count < m_best:
                    count += 1
            if count == m_best:
                beta = best_cost[m_best - 1]
            if max_nodes >= 0 and nodes >= max_nodes:
                budget_hit = True
                break
            if not _advance(c, x, nlo, nhi, lo, hi, 0):
                i = 1
                while i < n and not _advance(c, x, nlo, nhi, lo, hi, i):
                    i += 1
                if i >= n:
                    break
            continue
        if max_nodes >= 0 and nodes >= max_nodes and count > 0:
            budget_hit = True
            break
        i += 1
        while i < n and not _advance(c, x, nlo, nhi, lo, hi, i):
            i += 1
        if i >= n:
            break
    return count, nodes, not budget_hit


@njit(cache=True)
def _solve_rhs(R, Yo, S, Sg, LO, HI, max_nodes, X, cost, status, nodes, best_x, best_cost, j):
    n = R.shape[0]
    m_best = best_cost.shape[0]
    y = np.empty(n)
    s = np.empty(n)
    lo = np.empty(n, dtype=np.int64)
    hi = np.empty(n, dtype=np.int64)
    for i in range(n):
        y[i] = Yo[i, j]
        s[i] = gat(S, Sg, i, j)
        lo[i] = at(LO, i, j)
        hi[i] = at(HI, i, j)
    bx = np.zeros((m_best, n), dtype=np.int64)
    bc = np.full(m_best, np.inf)
    x = np.zeros(n, dtype=np.int64)
    cnt, nd, finished = _se_single(R, y, s, lo, hi, max_nodes, bx, bc,
                                   np.empty(n), x, np.empty(n),
                                   np.empty(n, dtype=np.int64),
                                   np.empty(n, dtype=np.int64), np.empty(n + 1))
    for i in range(n):
        X[i, j] = bx[0, i]
    cost[j] = bc[0]
    status[j] = _OPTIMAL if finished else _BUDGET
    nodes[j] = nd
    for r in range(m_best):
        best_cost[r, j] = bc[r]
        for i in range(n):
            best_x[r, i, j] = bx[r, i]


@njit(cache=True, parallel=True)
def _enumerate_all(R, Yo, S, Sg, LO, HI, max_nodes, X, cost, status, nodes, best_x, best_cost):
    for j in prange(Yo.shape[1]):
        _solve_rhs(R, Yo, S, Sg, LO, HI, max_nodes, X, cost, status, nodes, best_x, best_cost,
                   np.int64(j))


@njit(cache=True)
def _enumerate_one(R, Yo, S, Sg, LO, HI, max_nodes, X, cost, status, nodes, best_x, best_cost):
    """A single RHS without a parallel launch."""
    _solve_rhs(R, Yo, S, Sg, LO, HI, max_nodes, X, cost, status, nodes, best_x, best_cost, 0)


def enumerate_kernel(can, *, max_nodes, n_best):
    """Numba kernel of :func:`bils.enumerate` (same contract as ``_enumerate_numpy``)."""
    n, k = can.Y.shape
    Yo = readonly(np.ascontiguousarray(can.Y - can.offset.premultiply(can.R)))
    S, Sg, _, _, LO, HI = grids(can)
    x = np.empty((n, k), dtype=np.int64)
    cost = np.empty(k)
    status = np.empty(k, dtype=np.int8)
    nodes = np.empty(k, dtype=np.int64)
    best_x = np.zeros((n_best, n, k), dtype=np.int64)
    best_cost = np.full((n_best, k), np.inf)
    args = (readonly(can.R), Yo, S, Sg, LO, HI, int(max_nodes), x, cost, status, nodes, best_x,
            best_cost)
    if k == 1:
        _enumerate_one(*args)
    else:
        with numba.parallel_chunksize(1):  # dynamic scheduling: search sizes differ per RHS
            _enumerate_all(*args)
    info = {"nodes": nodes, "max_nodes": max_nodes}
    if n_best > 1:
        info.update(best_x=best_x, best_cost=best_cost)
    return x, cost, status, info
