r"""Numba box Babai: GPTQ's lazy-batch blocking with a BLAS product between panels.

Levels are decided from ``n - 1`` down to ``0`` in panels of ``block_size`` levels
(left-looking). For the panel ``[a, e)`` the wrapper forms, with one BLAS product,

.. math::

    G = R_{a:e,\,e:}\, Z_{e:}, \qquad Z = S \circ X + O,

``Z`` holding the decided points *with* their offset, so no separate ``R @ O`` product is
needed: level ``i`` subtracts :math:`R_{ii} O_i` itself. The panel kernel then works on
tiles of :data:`~bils._numba._common.TILE` right-hand sides in parallel (``prange``): it
copies its tile of ``Y - G`` into contiguous scratch, decides level by level and applies
the in-panel updates as register-blocked rank-4 updates. Each right-hand side sees the
same floating-point operations whatever the tiling, so results do not depend on the
thread count.

The same sweep draws Klein's sampled paths (:mod:`bils._numba.klein`): a non-negative
``sample`` switches the per-level decision from rounding to the discrete Gaussian.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..result import Status
from ._common import TILE, at, box_round, grids, readonly, uniform

__all__ = ["babai_kernel", "sweep"]

#: Klein's window half-width in standard deviations (``bils.klein.WINDOW_SIGMAS``).
WINDOW_SIGMAS = 6.0
#: Candidates per level kept in scratch by the sampler; wider windows recompute ``exp``.
_PBUF = 64
#: Weights below exp(-_SKIP_EXP) are dropped (see ``_weight``); windows wider than
#: _SKIP_MAX_WINDOW candidates keep every weight.
_SKIP_EXP = 45.0
_SKIP_MAX_WINDOW = 256


@njit(cache=True, inline="always")
def _load_tile(T, Y, G, has_g, a, j0, w):
    m = T.shape[0]
    for l in range(m):
        if has_g:
            for jj in range(w):
                T[l, jj] = Y[a + l, j0 + jj] - G[l, j0 + jj]
        else:
            for jj in range(w):
                T[l, jj] = Y[a + l, j0 + jj]


@njit(cache=True, inline="always")
def _rank1(T, rrow, z, lo_row, hi_row, w):
    """``T[l] -= rrow[l] * z`` for ``lo_row <= l < hi_row``."""
    for l in range(lo_row, hi_row):
        r = rrow[l]
        for jj in range(w):
            T[l, jj] -= r * z[jj]


@njit(cache=True, inline="always")
def _rank4(T, r0, r1, r2, r3, z0, z1, z2, z3, nrows, w):
    """Four successive rank-1 updates of rows ``[0, nrows)`` fused in one pass.

    Each element gets the operations of the four separate rank-1 updates, in order.
    """
    for l in range(nrows):
        a0 = r0[l]
        a1 = r1[l]
        a2 = r2[l]
        a3 = r3[l]
        for jj in range(w):
            T[l, jj] = (((T[l, jj] - a0 * z0[jj]) - a1 * z1[jj]) - a2 * z2[jj]) - a3 * z3[jj]


@njit(cache=True)
def klein_pick(c, d, lo, hi, tau, sqrt_tau, seed, sample, level, n, pbuf):
    """Klein's draw at one level, as ``bils.klein._klein_numpy``'s ``sample``.

    Candidates are the box integers within the window around the rounded centre ``m``,
    in ascending order, with weights ``exp(-((d (c - z))^2 - e_min) / tau)``; the draw is
    the inverse CDF at ``u * total`` with the counter-based uniform of (seed, sample,
    level). ``e_min`` is attained at ``m`` (the nearest box integer), weights decrease
    away from ``m`` on both sides, and only the contiguous run of weights above
    ``exp(-_SKIP_EXP)`` is evaluated (see :func:`_weight`).
    """
    m = box_round(c, lo, hi)
    if not tau > 0.0:
        return m
    flo = np.float64(lo)
    fhi = np.float64(hi)
    w = np.ceil(WINDOW_SIGMAS * sqrt_tau / abs(d)) + 1.0
    width = fhi - flo
    if width < w:
        w = width
    iw = np.int64(w)
    zlo = max(m - iw, flo)
    zhi = min(m + iw, fhi)
    skip = _SKIP_EXP if zhi - zlo < _SKIP_MAX_WINDOW else np.inf
    r = d * (c - m)
    emin = r * r
    za = m
    while za > zlo and _arg(d, c, za - 1.0, emin, tau) <= skip:
        za -= 1.0
    zb = m
    while zb < zhi and _arg(d, c, zb + 1.0, emin, tau) <= skip:
        zb += 1.0
    ncand = np.int64(zb - za) + 1
    nbuf = pbuf.shape[0]
    total = 0.0
    for q in range(ncand):
        p = _weight(d, c, za + q, emin, tau)
        if q < nbuf:
            pbuf[q] = p
        total += p
    u = uniform(seed, sample, level, n) * total
    cum = 0.0
    for q in range(ncand):
        cum += pbuf[q] if q < nbuf else _weight(d, c, za + q, emin, tau)
        if cum > u:
            return za + q
    return zb  # not reached: u < total


@njit(cache=True, inline="always")
def _arg(d, c, z, emin, tau):
    r = d * (c - z)
    return (r * r - emin) / tau


@njit(cache=True, inline="always")
def _weight(d, c, z, emin, tau):
    """``exp(-((d (c - z))^2 - e_min) / tau)`` (exactly 1 at the centre candidate).

    Weights below ``exp(-_SKIP_EXP)`` are never evaluated: in a window of fewer than
    ``_SKIP_MAX_WINDOW`` candidates they sum to less than half an ulp of the largest
    weight (1), so leaving them out moves the total and the cumulative sums by at most
    an ulp, and a draw can differ from the reference (which evaluates every ``exp``)
    only when ``u`` falls within an ulp of a boundary — the same order as the ulp
    differences between numpy's and libm's ``exp``.
    """
    arg = _arg(d, c, z, emin, tau)
    if arg == 0.0:
        return 1.0
    return math.exp(-arg)


@njit(cache=True)
def _sweep_tile(Y, G, has_g, RT, a, S, O, LO, HI, Z, X, cost, j0, j1,
                sample, tau, sqrt_tau, seeds, nlev):
    """Decide levels ``[a, a + m)`` of right-hand sides ``[j0, j1)``.

    ``sample < 0``: Babai (round to nearest); else Klein sample number ``sample``.
    """
    m = RT.shape[0]
    w = j1 - j0
    T = np.empty((m, w))
    _load_tile(T, Y, G, has_g, a, j0, w)
    zb = np.empty((4, w))
    cl = np.zeros(w)
    pbuf = np.empty(_PBUF)
    top = m
    while top > 0:
        bot = max(0, top - 4)
        for q in range(top - 1, bot - 1, -1):
            i = a + q
            rii = RT[q, q]
            zq = zb[top - 1 - q]
            for jj in range(w):
                j = j0 + jj
                s = at(S, i, j)
                o = at(O, i, j)
                t = T[q, jj] - rii * o
                d = rii * s
                if sample < 0:
                    xi = box_round(t / d, at(LO, i, j), at(HI, i, j))
                else:
                    xi = klein_pick(t / d, d, at(LO, i, j), at(HI, i, j), tau[j], sqrt_tau[j],
                                    seeds[j], sample, i, nlev, pbuf)
                X[i, j] = np.int64(xi)
                z = s * xi + o
                Z[i, j] = z
                zq[jj] = z
                e = t - d * xi
                cl[jj] += e * e
            _rank1(T, RT[q], zq, bot, q, w)
        if top - bot == 4:
            _rank4(T, RT[top - 1], RT[top - 2], RT[top - 3], RT[top - 4],
                   zb[0], zb[1], zb[2], zb[3], bot, w)
        else:
            for q in range(top - 1, bot - 1, -1):
                _rank1(T, RT[q], zb[top - 1 - q], 0, bot, w)
        top = bot
    for jj in range(w):
        cost[j0 + jj] += cl[jj]


@njit(cache=True, parallel=True)
def _sweep_panel(Y, G, has_g, RT, a, S, O, LO, HI, Z, X, cost, width,
                 sample, tau, sqrt_tau, seeds, nlev):
    k = Y.shape[1]
    for t in prange((k + width - 1) // width):
        j0 = t * width
        _sweep_tile(Y, G, has_g, RT, a, S, O, LO, HI, Z, X, cost, j0, min(k, j0 + width),
                    sample, tau, sqrt_tau, seeds, nlev)


_NO_F = readonly(np.zeros(1))
_NO_U = readonly(np.zeros(1, dtype=np.uint64))


def sweep(can, block_size, X, Z, cost, *, sample=-1, tau=_NO_F, sqrt_tau=_NO_F, seeds=_NO_U):
    """One left-looking blocked nearest-plane sweep over all right-hand sides.

    Fills ``X`` (n, k) int64, ``Z = S * X + O`` (n, k) float64 and ``cost`` (k,) in place.
    ``sample = -1`` is Babai; ``sample >= 0`` draws Klein sample ``sample`` with
    temperatures ``tau`` (k,) and per-RHS ``seeds`` (k,) uint64.
    """
    R = can.R
    Y = readonly(can.Y)
    n, k = Y.shape
    S, O, LO, HI = grids(can)
    cost[:] = 0.0
    G = np.empty((min(block_size, n), k))
    with np.errstate(over="ignore"):  # uint64 hashing wraps (matters with NUMBA_DISABLE_JIT)
        for e in range(n, 0, -block_size):
            a = max(0, e - block_size)
            Gp = G[: e - a]
            has_g = e < n
            if has_g:
                np.matmul(R[a:e, e:], Z[e:], out=Gp)
            RT = readonly(np.ascontiguousarray(R[a:e, a:e].T))
            _sweep_panel(Y, readonly(Gp), has_g, RT, a, S, O, LO, HI, Z, X, cost, TILE,
                         sample, tau, sqrt_tau, seeds, n)


def babai_kernel(can, *, block_size):
    """Numba kernel of :func:`bils.babai` (same contract as ``_babai_numpy``)."""
    n, k = can.Y.shape
    x = np.empty((n, k), dtype=np.int64)
    z = np.empty((n, k))
    cost = np.empty(k)
    sweep(can, block_size, x, z, cost)
    status = np.full(k, Status.HEURISTIC, dtype=np.int8)
    return x, cost, status, {"block_size": block_size}
