"""Tile helpers shared by the numba nearest-plane sweeps (Babai, Klein's sampled sweeps).

A *tile* is the target block ``T`` (levels x RHS) of one panel for a run of right-hand
sides, held in contiguous per-task scratch. Levels are decided from the panel's top
(``m - 1``) down, in steps of :data:`STEP` levels: inside a step each decided level updates
the rows of the step below it (:func:`rank1`); after the step, every row below it gets the
step's updates fused in one pass (:func:`update_below`), each element receiving the
operations of the separate rank-1 updates in the same order. The per-RHS floating-point
operations do not depend on the tile width, so results do not depend on the thread count.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["STEP", "bound_row", "grid_row", "load_tile", "rank1", "rank8", "rank16", "rank16_rows",
           "rank1_col", "update_below"]

#: Levels decided between two fused updates of the rows below (the rows of ``zb``).
STEP = 16


@njit(cache=True, inline="always")
def load_tile(T, Y, G, has_g, a, j0, w):
    """``T[l, :w] = Y[a + l, j0:j0 + w] - G[l, j0:j0 + w]`` (``G`` ignored without ``has_g``)."""
    m = T.shape[0]
    for l in range(m):
        if has_g:
            for jj in range(w):
                T[l, jj] = Y[a + l, j0 + jj] - G[l, j0 + jj]
        else:
            for jj in range(w):
                T[l, jj] = Y[a + l, j0 + jj]


@njit(cache=True, inline="always")
def grid_row(V, G, i, j0, w, out):
    """``out[:w]`` = row ``i`` of the grouped grid ``(V, G)`` for RHS ``[j0, j0 + w)``."""
    r = G[i]
    if V.shape[1] > 1:
        for jj in range(w):
            out[jj] = V[r, j0 + jj]
    else:
        v = V[r, 0]
        for jj in range(w):
            out[jj] = v


@njit(cache=True, inline="always")
def bound_row(B, i, j0, w, out):
    """``out[:w]`` = row ``i`` of the compact int64 bound ``B`` for RHS ``[j0, j0 + w)``, as float64."""
    ii = i if B.shape[0] > 1 else 0
    if B.shape[1] > 1:
        for jj in range(w):
            out[jj] = np.float64(B[ii, j0 + jj])
    else:
        v = np.float64(B[ii, 0])
        for jj in range(w):
            out[jj] = v


@njit(cache=True, inline="always")
def fixed_bounds(LO, HI, j0, w, lorow, hirow):
    """Whether the bounds vary per level; if not, fill the bound rows once for RHS
    ``[j0, j0 + w)`` (:func:`level_rows` refreshes them per level otherwise)."""
    per_level = LO.shape[0] > 1 or HI.shape[0] > 1
    if not per_level:
        bound_row(LO, 0, j0, w, lorow)
        bound_row(HI, 0, j0, w, hirow)
    return per_level


@njit(cache=True, inline="always")
def level_rows(S, Sg, O, Og, LO, HI, i, j0, w, srow, orow, lorow, hirow, sg_last, og_last, per_level):
    """Refresh level ``i``'s grid rows (only when its scale/offset group changed from
    ``sg_last``/``og_last``) and, with per-level bounds, its bound rows, for RHS
    ``[j0, j0 + w)``. Returns the new ``(sg_last, og_last)``."""
    if Sg[i] != sg_last:
        sg_last = Sg[i]
        grid_row(S, Sg, i, j0, w, srow)
    if Og[i] != og_last:
        og_last = Og[i]
        grid_row(O, Og, i, j0, w, orow)
    if per_level:
        bound_row(LO, i, j0, w, lorow)
        bound_row(HI, i, j0, w, hirow)
    return sg_last, og_last


@njit(cache=True, inline="always")
def rank1(T, rrow, z, lo_row, hi_row, w):
    """``T[l] -= rrow[l] * z`` for ``lo_row <= l < hi_row``."""
    for l in range(lo_row, hi_row):
        r = rrow[l]
        for jj in range(w):
            T[l, jj] -= r * z[jj]


@njit(cache=True, inline="always")
def rank8(T, RT, zb, top, nrows, w):
    """8 successive rank-1 updates of rows ``[0, nrows)`` fused in one pass: level
    ``top - 1 - r`` with points ``zb[r]``, ``r = 0, ..., 7``, in that order per element.
    """
    r0 = RT[top - 1]
    r1 = RT[top - 2]
    r2 = RT[top - 3]
    r3 = RT[top - 4]
    r4 = RT[top - 5]
    r5 = RT[top - 6]
    r6 = RT[top - 7]
    r7 = RT[top - 8]
    for l in range(nrows):
        a0 = r0[l]
        a1 = r1[l]
        a2 = r2[l]
        a3 = r3[l]
        a4 = r4[l]
        a5 = r5[l]
        a6 = r6[l]
        a7 = r7[l]
        for jj in range(w):
            t = T[l, jj]
            t = t - a0 * zb[0, jj]
            t = t - a1 * zb[1, jj]
            t = t - a2 * zb[2, jj]
            t = t - a3 * zb[3, jj]
            t = t - a4 * zb[4, jj]
            t = t - a5 * zb[5, jj]
            t = t - a6 * zb[6, jj]
            t = t - a7 * zb[7, jj]
            T[l, jj] = t


@njit(cache=True, inline="always")
def rank16(T, RT, zb, top, nrows, w):
    """16 successive rank-1 updates of rows ``[0, nrows)`` fused in one pass: level
    ``top - 1 - r`` with points ``zb[r]``, ``r = 0, ..., 15``, in that order per element.
    """
    r0 = RT[top - 1]
    r1 = RT[top - 2]
    r2 = RT[top - 3]
    r3 = RT[top - 4]
    r4 = RT[top - 5]
    r5 = RT[top - 6]
    r6 = RT[top - 7]
    r7 = RT[top - 8]
    r8 = RT[top - 9]
    r9 = RT[top - 10]
    r10 = RT[top - 11]
    r11 = RT[top - 12]
    r12 = RT[top - 13]
    r13 = RT[top - 14]
    r14 = RT[top - 15]
    r15 = RT[top - 16]
    for l in range(nrows):
        a0 = r0[l]
        a1 = r1[l]
        a2 = r2[l]
        a3 = r3[l]
        a4 = r4[l]
        a5 = r5[l]
        a6 = r6[l]
        a7 = r7[l]
        a8 = r8[l]
        a9 = r9[l]
        a10 = r10[l]
        a11 = r11[l]
        a12 = r12[l]
        a13 = r13[l]
        a14 = r14[l]
        a15 = r15[l]
        for jj in range(w):
            t = T[l, jj]
            t = t - a0 * zb[0, jj]
            t = t - a1 * zb[1, jj]
            t = t - a2 * zb[2, jj]
            t = t - a3 * zb[3, jj]
            t = t - a4 * zb[4, jj]
            t = t - a5 * zb[5, jj]
            t = t - a6 * zb[6, jj]
            t = t - a7 * zb[7, jj]
            t = t - a8 * zb[8, jj]
            t = t - a9 * zb[9, jj]
            t = t - a10 * zb[10, jj]
            t = t - a11 * zb[11, jj]
            t = t - a12 * zb[12, jj]
            t = t - a13 * zb[13, jj]
            t = t - a14 * zb[14, jj]
            t = t - a15 * zb[15, jj]
            T[l, jj] = t


@njit(cache=True, inline="always")
def rank16_rows(T, R, zb, top, nrows, w, coef):
    """:func:`rank16` with the coefficients read from ``R`` itself (row ``l``: ``R[l, top - 1 - r]``,
    contiguous), converted to the tile's precision through ``coef`` (16,): no transposed copy.
    """
    for l in range(nrows):
        coef[0] = R[l, top - 1]
        coef[1] = R[l, top - 2]
        coef[2] = R[l, top - 3]
        coef[3] = R[l, top - 4]
        coef[4] = R[l, top - 5]
        coef[5] = R[l, top - 6]
        coef[6] = R[l, top - 7]
        coef[7] = R[l, top - 8]
        coef[8] = R[l, top - 9]
        coef[9] = R[l, top - 10]
        coef[10] = R[l, top - 11]
        coef[11] = R[l, top - 12]
        coef[12] = R[l, top - 13]
        coef[13] = R[l, top - 14]
        coef[14] = R[l, top - 15]
        coef[15] = R[l, top - 16]
        a0 = coef[0]
        a1 = coef[1]
        a2 = coef[2]
        a3 = coef[3]
        a4 = coef[4]
        a5 = coef[5]
        a6 = coef[6]
        a7 = coef[7]
        a8 = coef[8]
        a9 = coef[9]
        a10 = coef[10]
        a11 = coef[11]
        a12 = coef[12]
        a13 = coef[13]
        a14 = coef[14]
        a15 = coef[15]
        for jj in range(w):
            t = T[l, jj]
            t = t - a0 * zb[0, jj]
            t = t - a1 * zb[1, jj]
            t = t - a2 * zb[2, jj]
            t = t - a3 * zb[3, jj]
            t = t - a4 * zb[4, jj]
            t = t - a5 * zb[5, jj]
            t = t - a6 * zb[6, jj]
            t = t - a7 * zb[7, jj]
            t = t - a8 * zb[8, jj]
            t = t - a9 * zb[9, jj]
            t = t - a10 * zb[10, jj]
            t = t - a11 * zb[11, jj]
            t = t - a12 * zb[12, jj]
            t = t - a13 * zb[13, jj]
            t = t - a14 * zb[14, jj]
            t = t - a15 * zb[15, jj]
            T[l, jj] = t


@njit(cache=True, inline="always")
def rank1_col(T, R, q, z, lo_row, hi_row, w, coef):
    """``T[l] -= R[l, q] * z`` for ``lo_row <= l < hi_row`` (``R[l, q]`` in the tile's precision)."""
    for l in range(lo_row, hi_row):
        coef[0] = R[l, q]
        r = coef[0]
        for jj in range(w):
            T[l, jj] -= r * z[jj]


@njit(cache=True, inline="always")
def update_below(T, RT, zb, top, bot, w):
    """Rows ``[0, bot)`` of ``T`` minus the updates of levels ``top - 1, ..., bot``.

    ``RT`` is the panel's ``R`` block transposed (row ``q`` holds ``R[:, q]``), ``zb[r]``
    the decided points of level ``top - 1 - r``.
    """
    if top - bot == 16:
        rank16(T, RT, zb, top, bot, w)
    elif top - bot == 8:
        rank8(T, RT, zb, top, bot, w)
    else:
        for q in range(top - 1, bot - 1, -1):
            rank1(T, RT[q], zb[top - 1 - q], 0, bot, w)
