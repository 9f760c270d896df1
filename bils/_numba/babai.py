r"""Numba box Babai: one pass per tile of right-hand sides, at the speed of a matrix product.

Babai's work is :math:`n^2 k` multiply-subtracts: every decided level ``q`` updates the
targets of all levels below it, :math:`T_{l} \mathrel{-}= R_{lq} z_q`. The default method
(:func:`whole_sweep`) gives each parallel task (``prange``) a tile of 64 (float64) or 128
(float32) right-hand sides and runs *all* levels for it, right-looking, in its own
contiguous tile ``T`` (n, w):

* levels are decided in steps of 16 (:data:`~bils._numba._tiles.STEP`); the decision of one
  level is a vectorised row operation (:func:`_decide_row`) and updates the rows of its step
  below it (rank-1);
* after each step the rows below it get the step's 16 updates in one fused pass
  (:func:`~bils._numba._tiles.rank16_rows`): each element of ``T`` is loaded and stored
  once per 16 levels, with the 16 coefficients of its row (read from ``R``'s row, so no
  transposed or single-precision copy of ``R`` is made) in registers. Each element
  receives the operations of the separate rank-1 updates in level order, so the result
  does not depend on the step or the tile width (nor the thread count).

No BLAS product and no barrier: tasks never wait for each other, and numba's thread pool
never takes turns with the BLAS pool (on a 2-core machine the hand-overs of the former
panel method — BLAS product, then numba panel, per 512 levels — cost as much CPU time as
the products themselves). The fused pass runs at the speed of a BLAS product in float32
(~50–70 G multiply-subtracts per second per core, measured) and ~75 % of it in float64,
without fused multiply-adds (no ``fastmath``: the numpy reference rounds the same way).

Grids are grouped (:class:`~bils.GroupedGrid`): a level reads its group's row of scale and
offset, refilled only when the group changes; bounds are compact arrays. Grid values stay
in float64 (a full per-coordinate (n, k) grid is read in place, never copied or
converted): the single-precision sweep converts each row as it reads it.

Klein's Babai pass is this sweep too (``whole_sweep(panel=, Yg=)``): it keeps the targets
at the start of every panel of Klein's sampled sweeps, which start from them.

The panel method (:func:`sweep`: BLAS products ``G = R_{a:e, e:} Z_{e:}`` between panels of
levels, in-panel tiles as above) is kept behind ``babai_kernel(..., panels=True)`` for
comparison.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from ..result import Status
from ._common import TILE, Clock, aligned_empty, grids, readonly
from ._tiles import (STEP, fixed_bounds, level_rows, load_tile, rank1, rank1_col, rank16_rows,
                     update_below)

__all__ = ["babai_kernel", "sweep", "whole_sweep", "panels", "gemm_panel", "tile_width"]


@njit(cache=True, error_model="numpy")
def _decide_row(trow, rii, srow, orow, lorow, hirow, zq, zout, xout, cl):
    """Babai's decision at one level for a row of right-hand sides (vectorised over them).

    ``x = clip(floor(t / d + 0.5), lo, hi)`` with ``t = T - R_ii o``, ``d = R_ii s`` (in the
    working precision; the rounding in float64); writes ``z = s x + o`` to ``zq`` and
    ``zout``, the code to ``xout`` and adds the squared residual to ``cl``. A separate,
    non-inlined function over 1-D rows, branch-free and with numpy's error model (no
    zero-division branch: ``d`` is never 0), so that the loop vectorises.
    """
    for jj in range(trow.shape[0]):
        s = srow[jj]
        o = orow[jj]
        t = trow[jj] - rii * o
        d = rii * s
        xi = min(max(np.floor(np.float64(t / d) + 0.5), lorow[jj]), hirow[jj])
        xout[jj] = np.int64(xi)
        z = s * xi + o
        zout[jj] = z
        zq[jj] = z
        e = t - d * xi
        cl[jj] += e * e


@njit(cache=True)
def _sweep_tile(Y, G, has_g, RT, a, S, Sg, O, Og, LO, HI, Z, X, cost, j0, j1):
    """Decide levels ``[a, a + m)`` of right-hand sides ``[j0, j1)`` (round to nearest)."""
    m = RT.shape[0]
    w = j1 - j0
    T = np.empty((m, w), dtype=RT.dtype)
    load_tile(T, Y, G, has_g, a, j0, w)
    zb = np.empty((STEP, w), dtype=RT.dtype)
    cl = np.zeros(w)
    srow = np.empty(w, dtype=S.dtype)
    orow = np.empty(w, dtype=O.dtype)
    lorow = np.empty(w)
    hirow = np.empty(w)
    # grid and bound rows are refilled only when the level's group (row) changes
    sg_last = -1
    og_last = -1
    per_level_bounds = fixed_bounds(LO, HI, j0, w, lorow, hirow)
    top = m
    while top > 0:
        bot = max(0, top - STEP)
        for q in range(top - 1, bot - 1, -1):
            i = a + q
            rii = RT[q, q]
            zq = zb[top - 1 - q]
            sg_last, og_last = level_rows(S, Sg, O, Og, LO, HI, i, j0, w, srow, orow, lorow, hirow,
                                          sg_last, og_last, per_level_bounds)
            _decide_row(T[q], rii, srow, orow, lorow, hirow, zq, Z[i, j0:j1], X[i, j0:j1], cl)
            rank1(T, RT[q], zq, bot, q, w)
        update_below(T, RT, zb, top, bot, w)
        top = bot
    for jj in range(w):
        cost[j0 + jj] += cl[jj]


@njit(cache=True, inline="always")
def _tile_scratch(Y, proto, LO, HI, j0, w):
    """A whole-sweep tile's working arrays: ``T`` (n, w), ``Y``'s columns ``[j0, j0 + w)``
    in the precision of ``proto`` on a cache line (see ``aligned_empty``), the step's codes
    ``zb``, scratch rows, the cost accumulator ``cl`` and the bound rows (filled once when
    the bounds do not vary per level: ``per_level_bounds`` False)."""
    n = Y.shape[0]
    dt = proto.dtype
    T = aligned_empty(n, w, proto)
    for l in range(n):
        for jj in range(w):
            T[l, jj] = Y[l, j0 + jj]
    zb = aligned_empty(STEP, w, proto)
    zdum = np.empty(w, dtype=dt)
    coef = np.empty(STEP, dtype=dt)
    cl = np.zeros(w)
    srow = np.empty(w, dtype=dt)  # grid rows in the working precision (converted as read)
    orow = np.empty(w, dtype=dt)
    lorow = np.empty(w)
    hirow = np.empty(w)
    per_level_bounds = fixed_bounds(LO, HI, j0, w, lorow, hirow)
    return T, zb, zdum, coef, cl, srow, orow, lorow, hirow, per_level_bounds


@njit(cache=True, inline="always")
def _tile_step(T, R, S, Sg, O, Og, LO, HI, X, j0, j1, top, bot, zb, zdum, coef, cl, srow, orow,
               lorow, hirow, sg_last, og_last, per_level_bounds):
    """Levels ``top - 1`` down to ``bot`` of a tile (one step of at most ``STEP`` levels):
    each decided and applied to the step's rows below it, then every row below the step
    gets the step's updates (one rank-16 pass for a full step). Returns the grid rows' cache
    keys ``(sg_last, og_last)``."""
    w = j1 - j0
    for q in range(top - 1, bot - 1, -1):
        coef[0] = R[q, q]
        rii = coef[0]
        zq = zb[top - 1 - q]
        sg_last, og_last = level_rows(S, Sg, O, Og, LO, HI, q, j0, w, srow, orow, lorow, hirow,
                                      sg_last, og_last, per_level_bounds)
        _decide_row(T[q], rii, srow, orow, lorow, hirow, zq, zdum, X[q, j0:j1], cl)
        rank1_col(T, R, q, zq, bot, q, w, coef)
    if top - bot == STEP:
        rank16_rows(T, R, zb, top, bot, w, coef)
    else:
        for q in range(top - 1, bot - 1, -1):
            rank1_col(T, R, q, zb[top - 1 - q], 0, bot, w, coef)
    return sg_last, og_last


@njit(cache=True)
def _whole_tile(Y, R, proto, S, Sg, O, Og, LO, HI, X, cost, j0, j1):
    """All levels of right-hand sides ``[j0, j1)``, right-looking, without BLAS products.

    The tile ``T`` (n, w) starts as ``Y``'s columns (in the precision of ``proto``); levels
    are decided in steps of :data:`~bils._numba._tiles.STEP`, each level updating the rows
    of its step below it, then every row below the step gets the step's 16 updates in one
    pass (:func:`~bils._numba._tiles.rank16_rows`, coefficients read from ``R``'s rows).
    """
    n = R.shape[0]
    w = j1 - j0
    T, zb, zdum, coef, cl, srow, orow, lorow, hirow, per_level_bounds = _tile_scratch(
        Y, proto, LO, HI, j0, w)
    sg_last = -1
    og_last = -1
    top = n
    while top > 0:
        bot = max(0, top - STEP)
        sg_last, og_last = _tile_step(T, R, S, Sg, O, Og, LO, HI, X, j0, j1, top, bot, zb, zdum,
                                      coef, cl, srow, orow, lorow, hirow, sg_last, og_last,
                                      per_level_bounds)
        top = bot
    for jj in range(w):
        cost[j0 + jj] += cl[jj]


@njit(cache=True)
def _panel_tile(Y, R, proto, S, Sg, O, Og, LO, HI, X, cost, j0, j1, panel, Yg):
    """:func:`_whole_tile` for Klein's Babai pass (``panel < n``): steps stop at the panel
    bounds of :func:`panels` (``e = n - panel, n - 2 panel, ...``); at each bound ``e`` the targets
    of the panel below it, ``T[a:e]`` (``a = max(0, e - panel)``: ``Y`` minus every update
    of the levels ``>= e``, in level order), are kept in ``Yg[a:e, j0:j1]`` and the
    squared residuals of the panel above are added to ``cost`` (a sum per panel, as the
    sampled sweeps sum theirs). Neither changes the codes: each element still receives
    the same operations in the same order.
    """
    n = R.shape[0]
    w = j1 - j0
    T, zb, zdum, coef, cl, srow, orow, lorow, hirow, per_level_bounds = _tile_scratch(
        Y, proto, LO, HI, j0, w)
    sg_last = -1
    og_last = -1
    edge = n - panel  # the next panel bound below (none when <= 0)
    top = n
    while top > 0:
        if top == edge:
            for jj in range(w):
                cost[j0 + jj] += cl[jj]
                cl[jj] = 0.0
            for l in range(max(0, edge - panel), edge):
                for jj in range(w):
                    Yg[l, j0 + jj] = T[l, jj]
            edge -= panel
        bot = max(0, top - STEP, edge)
        sg_last, og_last = _tile_step(T, R, S, Sg, O, Og, LO, HI, X, j0, j1, top, bot, zb, zdum,
                                      coef, cl, srow, orow, lorow, hirow, sg_last, og_last,
                                      per_level_bounds)
        top = bot
    for jj in range(w):
        cost[j0 + jj] += cl[jj]


@njit(cache=True, inline="always")
def _tile(Y, R, proto, S, Sg, O, Og, LO, HI, X, cost, j0, j1, panel, Yg):
    """One tile of the whole sweep: :func:`_whole_tile`, or :func:`_panel_tile` with panels."""
    if panel < R.shape[0]:
        _panel_tile(Y, R, proto, S, Sg, O, Og, LO, HI, X, cost, j0, j1, panel, Yg)
    else:
        _whole_tile(Y, R, proto, S, Sg, O, Og, LO, HI, X, cost, j0, j1)


@njit(cache=True, parallel=True)
def _whole(Y, R, proto, S, Sg, O, Og, LO, HI, X, cost, width, panel, Yg):
    k = Y.shape[1]
    for t in prange((k + width - 1) // width):
        j0 = t * width
        _tile(Y, R, proto, S, Sg, O, Og, LO, HI, X, cost, j0, min(k, j0 + width), panel, Yg)


@njit(cache=True, nogil=True)
def _whole_one(Y, R, proto, S, Sg, O, Og, LO, HI, X, cost, width, panel, Yg):
    """``_whole`` in the calling thread (the same tiles, one after another), without the GIL."""
    k = Y.shape[1]
    for j0 in range(0, k, width):
        _tile(Y, R, proto, S, Sg, O, Og, LO, HI, X, cost, j0, min(k, j0 + width), panel, Yg)


def tile_width(k, dtype):
    """RHS per parallel task: wider tiles amortise the coefficient loads; single precision
    takes twice the RHS (same bytes)."""
    return (2 * TILE if k >= 32 * TILE else TILE) * (8 // np.dtype(dtype).itemsize)


def whole_sweep(can, X, cost, dtype, *, panel=None, Yg=None, timings=None):
    """Babai's sweep over all levels per tile of RHS in one parallel launch (no BLAS products).

    Fills ``X`` (n, k) int64 and ``cost`` (k,) in place, working in ``dtype`` (float64 or
    float32; costs summed in float64). Each task owns a run of right-hand sides from
    start to end, so no thread waits for another and no BLAS thread pool takes turns with
    numba's; the in-panel updates run at the speed of a BLAS product (fused rank-16 passes
    over the task's tile).

    With ``panel`` and ``Yg`` (Klein's Babai pass), the targets at the start of every
    panel of :func:`panels` but the first are kept: ``Yg[a:e]`` (``Yg`` (r, k) in
    ``dtype``, ``r`` at least the first panel's lower bound ``n - panel``) holds
    ``Y[a:e]`` minus the updates of every level ``>= e`` in level order, and ``cost`` is
    summed per panel; the codes are those of the plain sweep.
    """
    clock = Clock(timings)
    Y = readonly(can.Y)
    n, k = Y.shape
    # grids stay in float64 (no converted copy, even of a full (n, k) grid): a level's row
    # is converted to the working precision as it is read, rounding as ``astype`` does
    S, Sg, O, Og, LO, HI = grids(can)
    cost[:] = 0.0
    if panel is None:
        panel, Yg = n, np.empty((0, 0), dtype=dtype)
    elif Yg is None or Yg.dtype != dtype or Yg.shape[0] < n - panel or Yg.shape[1] != k:
        raise ValueError(f"`Yg` must be a ({max(0, n - panel)}, {k}) {np.dtype(dtype)} array")
    clock.lap("grid")
    width = tile_width(k, dtype)
    # one tile, or one numba thread (a dask worker's default): no parallel launch, and the
    # single-threaded kernel releases the GIL (a worker's event loop keeps answering the
    # scheduler while a chunk solves; the parallel kernels keep the GIL, as numba's
    # workqueue threading layer must not be entered by two threads at once)
    fn = _whole if k > width and numba.get_num_threads() > 1 else _whole_one
    fn(Y, readonly(can.R), np.empty(0, dtype=dtype), S, Sg, O, Og, LO, HI, X, cost, width,
       max(1, int(panel)), Yg)
    clock.lap("sweep")


@njit(cache=True, parallel=True)
def _sweep_panel(Y, G, has_g, RT, a, S, Sg, O, Og, LO, HI, Z, X, cost, width):
    k = Y.shape[1]
    for t in prange((k + width - 1) // width):
        j0 = t * width
        _sweep_tile(Y, G, has_g, RT, a, S, Sg, O, Og, LO, HI, Z, X, cost, j0, min(k, j0 + width))


@njit(cache=True, nogil=True)
def _sweep_panel_one(Y, G, has_g, RT, a, S, Sg, O, Og, LO, HI, Z, X, cost, width):
    """``_sweep_panel`` in the calling thread (the same tiles, one after another), without the GIL."""
    k = Y.shape[1]
    for j0 in range(0, k, width):
        _sweep_tile(Y, G, has_g, RT, a, S, Sg, O, Og, LO, HI, Z, X, cost, j0, min(k, j0 + width))


def panels(n, block_size):
    """Panel bounds ``(a, e)`` in the order they are decided (top levels first)."""
    return [(max(0, e - block_size), e) for e in range(n, 0, -block_size)]


def sweep(can, panel, X, Z, cost, *, G_out=None, RTs=None, width=None, products=None, timings=None):
    """One left-looking nearest-plane (Babai) sweep in panels of ``panel`` levels.

    Fills ``X`` (n, k) int64, ``Z = S * X + O`` (n, k) and ``cost`` (k,, float64) in place.
    Works in the dtype of ``Z``: float64, or float32 for ``precision="float32"``, where
    each panel's rows of ``R`` are converted as they are used (no single-precision copy
    of the whole problem), ``Y`` is read in double precision into single-precision
    tiles, products and updates run in single precision and ``cost`` is summed in double
    precision from single-precision residuals.
    With ``G_out`` (n, k), the products ``R[a:e, e:] @ Z[e:]`` of every panel are kept
    in ``G_out[a:e]`` (zero for the first panel: what Klein's sampled sweeps started
    from until its Babai pass became :func:`whole_sweep`).
    ``RTs``, one per panel of :func:`panels` (float64 sweeps only), are the panels'
    transposed diagonal blocks ``R[a:e, a:e].T`` (C-contiguous, read-only) when the caller
    has them already (as Klein's packed panel blocks). ``width``: right-hand
    sides per in-panel task (default :func:`tile_width`); it does not change the result.
    ``products``, a :class:`~bils._numba._blas.Products` inside its ``with`` block, runs
    the panels' products (no spinning OpenBLAS pool beside the in-panel kernels).
    """
    clock = Clock(timings)
    R = can.R
    Y = readonly(can.Y)
    n, k = Y.shape
    dtype = Z.dtype
    S, Sg, O, Og, LO, HI = grids(can, dtype)
    clock.lap("grid")
    cost[:] = 0.0
    G = np.empty((min(panel, n), k), dtype=dtype) if G_out is None else None
    Rbuf = None if dtype == R.dtype else np.empty((min(panel, n), n), dtype=dtype)
    width = tile_width(k, dtype) if width is None else width
    panel_fn = _sweep_panel if k > width and numba.get_num_threads() > 1 else _sweep_panel_one
    for p, (a, e) in enumerate(panels(n, panel)):
        Gp = G[: e - a] if G_out is None else G_out[a:e]
        has_g = e < n
        if Rbuf is None:
            Rp = R[a:e, a:]
        else:
            Rp = Rbuf[: e - a, : n - a]
            np.copyto(Rp, R[a:e, a:])
        clock.lap("convert")
        if has_g:
            if products is None:
                np.matmul(Rp[:, e - a:], Z[e:], out=Gp)
            else:
                products.matmul(Rp[:, e - a:], Z[e:], Gp)
        elif G_out is not None:
            Gp[...] = 0.0
        clock.lap("product")
        RT = readonly(np.ascontiguousarray(Rp[:, : e - a].T)) if RTs is None else RTs[p]
        clock.lap("convert")
        panel_fn(Y, readonly(Gp), has_g, RT, a, S, Sg, O, Og, LO, HI, Z, X, cost, width)
        clock.lap("panel")


#: Fewest levels per panel of the Babai kernel. On a 2-core machine the product with
#: 512 rows runs at ~117 GF/s against ~86 GF/s with 128 (Z is repacked for every product),
#: and fewer panels mean fewer thread-pool hand-overs between numba and BLAS; the extra
#: in-panel work (n * panel * k flops) is far smaller than what the products save.
MIN_PANEL = 512


def gemm_panel(block_size):
    """Levels per panel for ``block_size``: the smallest multiple of it >= ``MIN_PANEL``.

    Panels are unions of consecutive ``block_size`` blocks; the result does not depend on
    the blocking (up to rounding), only the speed does.
    """
    return block_size * max(1, -(-MIN_PANEL // block_size))


def babai_kernel(can, *, block_size, precision="float64", timings=None, panels=False):
    """Numba kernel of :func:`bils.babai` (same contract as ``_babai_numpy``).

    ``timings``, a dict, receives the seconds spent per phase (see :class:`~bils._numba._common.Clock`).
    ``panels=True`` runs the panel sweep with BLAS products between panels (the former
    method, kept for comparison) instead of :func:`whole_sweep`. ``block_size`` does not
    change the result (up to rounding), only the panel method's speed.
    """
    clock = Clock(timings)
    n, k = can.Y.shape
    dtype = np.dtype(precision)
    x = np.empty((n, k), dtype=np.int64)
    cost = np.empty(k)
    clock.lap("assemble")
    if panels:
        sweep(can, gemm_panel(block_size), x, np.empty((n, k), dtype=dtype), cost,
              timings=timings)
    else:
        whole_sweep(can, x, cost, dtype, timings=timings)
    clock.restart()
    status = np.full(k, Status.HEURISTIC, dtype=np.int8)
    clock.lap("assemble")
    return x, cost, status, {"block_size": block_size, "precision": precision}
