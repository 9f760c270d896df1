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


#: Phases of a resumable search (``state[j, 3]``).
_FRESH, _RUNNING, _DONE, _BUDGET_HIT = 0, 1, 2, 3


@njit(cache=True)
def _se_resume(R, y, s, lo, hi, max_nodes, best_x, best_cost,
               d, x, c, nlo, nhi, partial, state, slice_nodes):
    """Run one Schnorr–Euchner search for at most ``slice_nodes`` more nodes.

    The whole search state lives in the arrays passed in (``x``, ``c``, ``nlo``, ``nhi``,
    ``partial``, the m-best list and ``state = [level, count, nodes, phase]``), so the
    search resumes exactly where it stopped: a search run in slices visits the same
    nodes in the same order as one run to the end. ``slice_nodes <= 0`` means no slice
    limit. Fills ``best_x`` (m, n) / ``best_cost`` (m,) sorted.
    """
    n = R.shape[0]
    m_best = best_cost.shape[0]
    if state[3] == _FRESH:
        for i in range(n):
            d[i] = R[i, i] * s[i]
        partial[n] = 0.0
        i = n - 1
        c[i] = _centre(R, y, s, x, i, n, d)
        _first(c, x, nlo, nhi, lo, hi, i)
        state[0] = i
        state[1] = 0
        state[2] = 0
        state[3] = _RUNNING
    if state[3] != _RUNNING:
        return
    i = state[0]
    count = state[1]
    nodes = state[2]
    beta = best_cost[m_best - 1] if count == m_best else np.inf
    stop = nodes + slice_nodes if slice_nodes > 0 else np.int64(2**62)
    phase = _DONE
    while True:
        if nodes >= stop:  # pause: the loop resumes here with the same level and point
            phase = _RUNNING
            break
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
                phase = _BUDGET_HIT
                break
            if not _advance(c, x, nlo, nhi, lo, hi, 0):
                i = 1
                while i < n and not _advance(c, x, nlo, nhi, lo, hi, i):
                    i += 1
                if i >= n:
                    break
            continue
        if max_nodes >= 0 and nodes >= max_nodes and count > 0:
            phase = _BUDGET_HIT
            break
        i += 1
        while i < n and not _advance(c, x, nlo, nhi, lo, hi, i):
            i += 1
        if i >= n:
            break
    state[0] = i
    state[1] = count
    state[2] = nodes
    state[3] = phase


@njit(cache=True)
def _resume_rhs(R, Yo, S, Sg, LO, HI, max_nodes, slice_nodes, y, sv, lov, hiv, d, x, c, nlo, nhi,
                partial, bx, bc, state, j, jj):
    """Resume the search of RHS ``j`` (global column) held in row ``jj`` of the state."""
    n = R.shape[0]
    if state[jj, 3] == _FRESH:
        for i in range(n):
            y[jj, i] = Yo[i, j]
            sv[jj, i] = gat(S, Sg, i, j)
            lov[jj, i] = at(LO, i, j)
            hiv[jj, i] = at(HI, i, j)
            x[jj, i] = 0
    _se_resume(R, y[jj], sv[jj], lov[jj], hiv[jj], max_nodes, bx[jj], bc[jj], d[jj], x[jj],
               c[jj], nlo[jj], nhi[jj], partial[jj], state[jj], slice_nodes)


@njit(cache=True, parallel=True)
def _resume_all(R, Yo, S, Sg, LO, HI, max_nodes, slice_nodes, j0, y, sv, lov, hiv, d, x, c, nlo,
                nhi, partial, bx, bc, state):
    for jj in prange(state.shape[0]):
        if state[jj, 3] <= _RUNNING:
            _resume_rhs(R, Yo, S, Sg, LO, HI, max_nodes, slice_nodes, y, sv, lov, hiv, d, x, c,
                        nlo, nhi, partial, bx, bc, state, j0 + np.int64(jj), np.int64(jj))


@njit(cache=True)
def _resume_one(R, Yo, S, Sg, LO, HI, max_nodes, slice_nodes, j0, y, sv, lov, hiv, d, x, c, nlo,
                nhi, partial, bx, bc, state):
    """``_resume_all`` for a single RHS, without a parallel launch."""
    if state[0, 3] <= _RUNNING:
        _resume_rhs(R, Yo, S, Sg, LO, HI, max_nodes, slice_nodes, y, sv, lov, hiv, d, x, c, nlo,
                    nhi, partial, bx, bc, state, j0, 0)


#: Right-hand sides whose searches run side by side (state arrays are sized by it: about
#: ``8 (7 n + n_best (n + 1))`` bytes each).
CHUNK_RHS = 4096
#: Nodes visited per kernel call, summed over the chunk's running searches: between
#: calls the interpreter runs, so Ctrl-C stops a long search within about one call.
SLICE_NODES = 1 << 22
#: Smallest per-search slice (bounds the call overhead when many searches run).
MIN_SLICE = 1024


def enumerate_kernel(can, *, max_nodes, n_best):
    """Numba kernel of :func:`bils.enumerate` (same contract as ``_enumerate_numpy``).

    Searches run in chunks of :data:`CHUNK_RHS` right-hand sides, each chunk in slices
    of about :data:`SLICE_NODES` nodes from a Python loop (results are those of one
    uninterrupted search: the state is kept between slices).
    """
    n, k = can.Y.shape
    Yo = readonly(np.ascontiguousarray(can.Y - can.offset.premultiply(can.R)))
    S, Sg, _, _, LO, HI = grids(can)
    R = readonly(can.R)
    x_out = np.empty((n, k), dtype=np.int64)
    cost = np.empty(k)
    status = np.empty(k, dtype=np.int8)
    nodes = np.empty(k, dtype=np.int64)
    best_x = np.zeros((n_best, n, k), dtype=np.int64)
    best_cost = np.full((n_best, k), np.inf)
    for j0 in range(0, k, CHUNK_RHS):
        w = min(CHUNK_RHS, k - j0)
        y = np.empty((w, n))
        sv = np.empty((w, n))
        lov = np.empty((w, n), dtype=np.int64)
        hiv = np.empty((w, n), dtype=np.int64)
        d = np.empty((w, n))
        x = np.zeros((w, n), dtype=np.int64)
        c = np.empty((w, n))
        nlo = np.empty((w, n), dtype=np.int64)
        nhi = np.empty((w, n), dtype=np.int64)
        partial = np.empty((w, n + 1))
        bx = np.zeros((w, n_best, n), dtype=np.int64)
        bc = np.full((w, n_best), np.inf)
        state = np.zeros((w, 4), dtype=np.int64)
        args = (y, sv, lov, hiv, d, x, c, nlo, nhi, partial, bx, bc, state)
        while True:
            running = int(np.count_nonzero(state[:, 3] <= _RUNNING))
            if running == 0:
                break
            slice_nodes = max(MIN_SLICE, SLICE_NODES // running)
            if w == 1:
                _resume_one(R, Yo, S, Sg, LO, HI, int(max_nodes), slice_nodes, j0, *args)
            else:
                with numba.parallel_chunksize(1):  # dynamic scheduling: search sizes differ
                    _resume_all(R, Yo, S, Sg, LO, HI, int(max_nodes), slice_nodes, j0, *args)
        cols = slice(j0, j0 + w)
        x_out[:, cols] = bx[:, 0, :].T
        cost[cols] = bc[:, 0]
        status[cols] = np.where(state[:, 3] == _DONE, _OPTIMAL, _BUDGET)
        nodes[cols] = state[:, 2]
        best_x[:, :, cols] = bx.transpose(1, 2, 0)
        best_cost[:, cols] = bc.T
    info = {"nodes": nodes, "max_nodes": max_nodes}
    if n_best > 1:
        info.update(best_x=best_x, best_cost=best_cost)
    return x_out, cost, status, info
