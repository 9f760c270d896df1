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

from numba import njit

__all__ = ["STEP", "load_tile", "rank1", "rank4", "update_below"]

#: Levels decided between two fused updates of the rows below (the rows of ``zb``).
STEP = 4


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
def rank1(T, rrow, z, lo_row, hi_row, w):
    """``T[l] -= rrow[l] * z`` for ``lo_row <= l < hi_row``."""
    for l in range(lo_row, hi_row):
        r = rrow[l]
        for jj in range(w):
            T[l, jj] -= r * z[jj]


@njit(cache=True, inline="always")
def rank4(T, r0, r1, r2, r3, z0, z1, z2, z3, nrows, w):
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


@njit(cache=True, inline="always")
def update_below(T, RT, zb, top, bot, w):
    """Rows ``[0, bot)`` of ``T`` minus the updates of levels ``top - 1, ..., bot``.

    ``RT`` is the panel's ``R`` block transposed (row ``q`` holds ``R[:, q]``), ``zb[r]``
    the decided points of level ``top - 1 - r``.
    """
    if top - bot == 4:
        rank4(T, RT[top - 1], RT[top - 2], RT[top - 3], RT[top - 4],
              zb[0], zb[1], zb[2], zb[3], bot, w)
    else:
        for q in range(top - 1, bot - 1, -1):
            rank1(T, RT[q], zb[top - 1 - q], 0, bot, w)
