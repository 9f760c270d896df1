r"""Numba Klein: the Babai sweep plus ``n_samples`` sampled sweeps, best kept per RHS.

A sampled sweep is the nearest-plane recursion of :mod:`bils._numba.babai` with every
decision drawn from Klein's discrete Gaussian (:func:`klein_pick`). The uniforms come from
the counter-based generator of :mod:`bils._rng` (one seed per RHS drawn from ``rng``
before the kernel, then a pure function of (seed, sample, level)), so samples are the
same on every backend and thread count.

Sampled sweeps without matrix products. A sample's decided points differ from the Babai
point's in few places (of the order of 10% of the levels on layer-shaped problems), so
the targets at the start of the panel ``[a, e)`` are

.. math::

    Y_{a:e} - R_{a:e,\,e:} Z^{(s)}_{e:} = \big(Y_{a:e} - R_{a:e,\,e:} Z^{(b)}_{e:}\big)
        - \sum_{l \ge e,\; x^{(s)}_l \ne x^{(b)}_l} R_{a:e,\,l}\; s_l (x^{(s)}_l - x^{(b)}_l),

where the first term is kept from the Babai sweep (``Yg``: the plain Babai's whole
sweep, :func:`~bils._numba.babai.whole_sweep`, keeps its targets at every panel start,
``Y`` minus the updates of the levels above in level order) and the sum runs over a
per-tile list of the levels where the sample left the Babai point, recorded as the levels
are decided. Work per sample is proportional to the number of differences instead of a
full ``n^2 k`` product. The sum is applied per RHS in ascending level order, four
differences per pass over the panel's rows (:func:`_corrections`), so every element gets
its products and sums rounded exactly as a loop over the differences would. A sample
equal to the Babai point thus starts every panel from bitwise the Babai sweep's targets
and decides its levels with the same operations (the Babai cost is summed per panel, as
the samples' are), so it has bitwise the Babai cost and ``improved`` is exact.

Right-hand sides are independent, so the sampled sweeps need no barrier between panels:
one parallel launch gives each task a tile of RHS and takes it through every sample and
panel, keeping the better point per RHS after each sample (:func:`_tile_samples`). The
tile's codes and difference lists live in per-thread scratch.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

from ..result import Status
from ._common import ALIGN, TILE, Clock, at, box_round, grids, readonly, uniform
from ._tiles import STEP, fixed_bounds, level_rows, rank1, update_below
from .babai import panels, whole_sweep

__all__ = ["klein_kernel", "klein_panel", "klein_pick"]

#: Klein's window half-width in standard deviations (``bils.klein.WINDOW_SIGMAS``).
WINDOW_SIGMAS = 6.0
#: Weights below ``exp(-_SKIP_EXP)`` are not evaluated (see :func:`klein_pick`).
_SKIP_EXP = 45.0
#: Candidates per side of the centre whose weights are kept in scratch.
_NBUF = 32
#: Fewest levels per panel of the numba Klein's sampled sweeps (the Babai sweep keeps its
#: targets at the same panel starts and sums its cost per panel: a sample equal to the
#: Babai point then has bitwise the Babai cost, so ``improved`` is exact). The panel is the
#: smallest multiple of ``block_size`` at least this large: on a 4096 x 4096 layer with
#: S = 8, panels of 128 levels cost 2.2x the CPU time of panels of 1024 (when the Babai
#: sweep still made BLAS products per panel; a parallel launch per panel and sample);
#: 512: 1.2x, 2048: 1.0x (measured side by side). The corrections of a sample cost the
#: same for any panel size (a sum over the levels below each panel where the sample left
#: the Babai point), the in-panel sweep grows with it.
MIN_PANEL = 1024
#: Right-hand sides per parallel task of a sampled sweep (wide tiles: each task streams
#: the panel's rows of ``R`` once, and each row of ``R`` and of ``zb`` loaded in the
#: in-panel updates serves more right-hand sides). One sample on 4096 x 2048, one thread,
#: CPU seconds side by side: 0.35-0.40 with 256, 0.44-0.54 with 128; 4096 x 1024: 0.21
#: against 0.23; 512 was slower than 128. The width does not change the result.
SAMPLE_TILE = 256


@njit(cache=True)
def _window(d, sqrt_tau, flo, fhi):
    w = np.ceil(WINDOW_SIGMAS * sqrt_tau / abs(d)) + 1.0
    if fhi - flo < w:
        w = fhi - flo
    return w


@njit(cache=True)
def klein_pick(c, d, lo, hi, tau, sqrt_tau, seed, sample, level, n, lbuf, ubuf):
    r"""Klein's draw at one level, as ``bils.klein._klein_numpy``'s ``sample``.

    Candidates: the box integers ``z`` within the window ``|z - m| <= w`` around the
    rounded centre ``m`` (``w = ceil(6 sqrt(tau) / |d|) + 1``), in ascending order, with
    weights :math:`\exp(-((d (c - z))^2 - e_{min}) / \tau)`; the draw is the first
    candidate whose cumulative weight exceeds ``u * total`` (``u`` the counter-based
    uniform of (seed, sample, level)).

    ``e_min`` is attained at ``m`` (the nearest box integer; its weight is exactly 1) and
    the weights decrease away from ``m`` on both sides, so only the run of candidates
    around ``m`` with exponent at most ``_SKIP_EXP`` (45) is evaluated. Within the window
    the exponent is at most ``(6 + 2.5 |d| / sqrt(tau))**2``, which exceeds 45 only when
    ``|d| / sqrt(tau) > 0.28``, i.e. for windows of fewer than 50 candidates; the skipped
    weights (each below ``exp(-45)``) then sum to less than 2e-18, under half an ulp of
    the largest weight. Leaving them out moves the total and the cumulative sums by at
    most an ulp, so a draw can differ from the reference (which evaluates every ``exp``)
    only when ``u`` falls within an ulp of a boundary — the same order as the ulp
    differences between numpy's and libm's ``exp``. The window itself is only computed
    when the run reaches beyond ``m ± 2`` (``w >= 2`` always).
    """
    m = box_round(c, lo, hi)
    if not tau > 0.0:
        return m
    flo = np.float64(lo)
    fhi = np.float64(hi)
    r = d * (c - m)
    emin = r * r
    w = -1.0
    nl = 0  # accepted candidates below m: m - 1, ..., m - nl (weights in lbuf)
    while True:
        z = m - (nl + 1)
        if not z >= flo:
            break
        if nl >= 2:
            if w < 0.0:
                w = _window(d, sqrt_tau, flo, fhi)
            if not m - z <= w:
                break
        r = d * (c - z)
        arg = (r * r - emin) / tau
        if not arg <= _SKIP_EXP:
            break
        if nl < lbuf.shape[0]:
            lbuf[nl] = math.exp(-arg)
        nl += 1
    nu = 0
    while True:
        z = m + (nu + 1)
        if not z <= fhi:
            break
        if nu >= 2:
            if w < 0.0:
                w = _window(d, sqrt_tau, flo, fhi)
            if not z - m <= w:
                break
        r = d * (c - z)
        arg = (r * r - emin) / tau
        if not arg <= _SKIP_EXP:
            break
        if nu < ubuf.shape[0]:
            ubuf[nu] = math.exp(-arg)
        nu += 1
    if nl == 0 and nu == 0:
        return m
    # total in ascending order of z: m - nl, ..., m - 1, m, m + 1, ..., m + nu
    total = 0.0
    for q in range(nl - 1, -1, -1):
        total += _wt(lbuf, q, m - (q + 1), d, c, emin, tau)
    total += 1.0
    for q in range(nu):
        total += _wt(ubuf, q, m + (q + 1), d, c, emin, tau)
    u = uniform(seed, sample, level, n) * total
    cum = 0.0
    for q in range(nl - 1, -1, -1):
        cum += _wt(lbuf, q, m - (q + 1), d, c, emin, tau)
        if cum > u:
            return m - (q + 1)
    cum += 1.0
    if cum > u:
        return m
    for q in range(nu):
        cum += _wt(ubuf, q, m + (q + 1), d, c, emin, tau)
        if cum > u:
            return m + (q + 1)
    return m + nu  # not reached: u < total


@njit(cache=True, inline="always")
def _wt(buf, q, z, d, c, emin, tau):
    if q < buf.shape[0]:
        return buf[q]
    r = d * (c - z)
    return math.exp(-((r * r - emin) / tau))


@njit(cache=True, inline="always")
def exp_neg(a):
    """``exp(-a)`` for ``0 <= a <= 45``, branch-free so that row loops vectorise.

    Cody–Waite reduction ``-a = k ln 2 + r``, ``|r| <= ln(2) / 2``, degree-13 Taylor
    polynomial, and ``2**k`` assembled from the bits of ``-k`` (exact). Within 1 ulp of
    numpy's ``exp`` on this range.
    """
    x = -min(max(a, 0.0), _SKIP_EXP)
    k = np.floor(x * 1.4426950408889634 + 0.5)
    r = (x - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10
    p = 1.6059043836821613e-10
    p = p * r + 2.08767569878681e-09
    p = p * r + 2.505210838544172e-08
    p = p * r + 2.755731922398589e-07
    p = p * r + 2.7557319223985893e-06
    p = p * r + 2.48015873015873e-05
    p = p * r + 0.0001984126984126984
    p = p * r + 0.001388888888888889
    p = p * r + 0.008333333333333333
    p = p * r + 0.041666666666666664
    p = p * r + 0.16666666666666666
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    j = np.int64(-k)
    f = 0.5 if (j & 1) else 1.0
    f = f * (0.25 if (j & 2) else 1.0)
    f = f * (0.0625 if (j & 4) else 1.0)
    f = f * (0.00390625 if (j & 8) else 1.0)
    f = f * (1.52587890625e-05 if (j & 16) else 1.0)
    f = f * (2.3283064365386963e-10 if (j & 32) else 1.0)
    f = f * (5.421010862427522e-20 if (j & 64) else 1.0)
    return p * f


@njit(cache=True, error_model="numpy")
def _klein_row(trow_in, rii, srow, orow, lorow, hirow, taur, seedr, sample, level, nlev,
               trow, drow, crow, xrow, simple):
    """Klein's draw for one level of a tile of RHS, vectorised over the RHS.

    Handles the common case where only ``m - 1, m, m + 1`` carry weight above
    ``exp(-_SKIP_EXP)`` (``m ± 2`` outside the box or negligible; the window always
    contains ``m ± 2``), with the same sums in the same order as :func:`klein_pick`;
    other entries get ``simple = False`` and are drawn by :func:`klein_pick`.
    """
    for jj in range(trow.shape[0]):
        s = srow[jj]
        o = orow[jj]
        flo = lorow[jj]
        fhi = hirow[jj]
        ta = taur[jj]
        tt = trow_in[jj] - rii * o
        d = rii * s
        c = tt / d
        m = min(max(np.floor(c + 0.5), flo), fhi)
        r = d * (c - m)
        emin = r * r
        r = d * (c - (m - 1.0))
        am = (r * r - emin) / ta
        r = d * (c - (m + 1.0))
        ap = (r * r - emin) / ta
        r = d * (c - (m - 2.0))
        am2 = (r * r - emin) / ta
        r = d * (c - (m + 2.0))
        ap2 = (r * r - emin) / ta
        pm = exp_neg(am) if (am <= _SKIP_EXP) & (m - 1.0 >= flo) else 0.0
        pp = exp_neg(ap) if (ap <= _SKIP_EXP) & (m + 1.0 <= fhi) else 0.0
        c2 = pm + 1.0
        u = uniform(seedr[jj], sample, level, nlev) * (c2 + pp)
        pick = m if c2 > u else m + 1.0
        pick = m - 1.0 if pm > u else pick
        positive = ta > 0.0
        ok = ((am2 > _SKIP_EXP) | (m - 2.0 < flo)) & ((ap2 > _SKIP_EXP) | (m + 2.0 > fhi))
        xrow[jj] = pick if positive else m
        simple[jj] = ok | (not positive)
        trow[jj] = tt
        drow[jj] = d
        crow[jj] = c


#: Padding (elements) of the rows of the corrections ``CT`` (w, m): the target tile reads
#: ``CT`` down its columns, and rows 1024 doubles apart (8 KB, a power of two) all fall
#: in the same L1 and few L2 sets. One 1024 x 256 tile: 0.5 ms with unpadded rows, 0.12 ms
#: with 8 more elements (one thread, microbenchmark).
CT_PAD = 8
#: Levels of differences gathered per right-hand side before they are applied (see
#: :func:`_corrections`): the block's rows of ``R`` (``CORR_LEVELS x panel`` doubles) stay
#: in the core's L2 cache while each RHS's row of corrections takes them 4 at a time.
CORR_LEVELS = 64


@njit(cache=True, error_model="numpy")
def _axpy4(ct, r1, r2, r3, r4, d1, d2, d3, d4):
    """``ct += r1 d1``, then ``+= r2 d2``, ``+= r3 d3``, ``+= r4 d4``, rounded after each
    product and each sum as four separate updates would be: one pass over ``ct``."""
    for l in range(ct.shape[0]):
        ct[l] = (((ct[l] + r1[l] * d1) + r2[l] * d2) + r3[l] * d3) + r4[l] * d4


@njit(cache=True, error_model="numpy")
def _axpy2(ct, r1, r2, d1, d2):
    """``ct += r1 d1``, then ``+= r2 d2`` (as :func:`_axpy4`)."""
    for l in range(ct.shape[0]):
        ct[l] = (ct[l] + r1[l] * d1) + r2[l] * d2


@njit(cache=True, error_model="numpy")
def _axpy1(ct, r1, d1):
    """``ct += r1 d1``."""
    for l in range(ct.shape[0]):
        ct[l] = ct[l] + r1[l] * d1


@njit(cache=True)
def _corrections(CT, RS, e, nlev, t, j0, dcnt, djj, dval):
    r"""``CT[jj, :m] += \sum_{lv} RS[lv - e] dval`` over the differences of tile ``t`` at levels ``lv >= e``.

    ``m = RS.shape[1]``; ``CT`` may have longer rows (padding, see :data:`CT_PAD`).

    ``dcnt[lv, t]`` differences are listed at level ``lv`` (tile columns
    ``djj[lv, j0:j0 + cnt]``, values ``dval[lv, j0:j0 + cnt]``). Each element of ``CT``
    receives its products in ascending level order, one rounded product and one rounded
    sum each, exactly as the plain loop over levels and differences would; the levels are
    taken in blocks of :data:`CORR_LEVELS`, whose differences are regrouped per column
    and applied four at a time (:func:`_axpy4`): one load and store of the column's
    corrections per four differences instead of per difference.
    """
    w = CT.shape[0]
    m = RS.shape[1]
    cntj = np.zeros(w + 1, dtype=np.int64)
    pos = np.empty(w, dtype=np.int64)
    rows = np.empty(CORR_LEVELS * w, dtype=np.int64)
    vals = np.empty(CORR_LEVELS * w)
    for b0 in range(e, nlev, CORR_LEVELS):
        b1 = min(nlev, b0 + CORR_LEVELS)
        for jj in range(w + 1):
            cntj[jj] = 0
        for lv in range(b0, b1):
            for q in range(dcnt[lv, t]):
                cntj[djj[lv, j0 + q] + 1] += 1
        for jj in range(w):
            cntj[jj + 1] += cntj[jj]
            pos[jj] = cntj[jj]
        for lv in range(b0, b1):  # ascending levels: each column's list stays in level order
            for q in range(dcnt[lv, t]):
                jj = djj[lv, j0 + q]
                p = pos[jj]
                rows[p] = lv - e
                vals[p] = dval[lv, j0 + q]
                pos[jj] = p + 1
        for jj in range(w):
            p = cntj[jj]
            p1 = cntj[jj + 1]
            ct = CT[jj, :m]
            while p + 4 <= p1:
                _axpy4(ct, RS[rows[p]], RS[rows[p + 1]], RS[rows[p + 2]], RS[rows[p + 3]],
                       vals[p], vals[p + 1], vals[p + 2], vals[p + 3])
                p += 4
            if p + 2 <= p1:
                _axpy2(ct, RS[rows[p]], RS[rows[p + 1]], vals[p], vals[p + 1])
                p += 2
            if p < p1:
                _axpy1(ct, RS[rows[p]], vals[p])


@njit(cache=True, error_model="numpy")
def _record_row(xrow, srow, orow, trow, drow, zq, cl, xout, xbrow, djj, dval):
    """Store one level's draws of a tile of RHS and list where they leave the Babai point.

    Writes the codes to ``xout``, ``z = s x + o`` to ``zq`` and adds the squared residual
    to ``cl`` (a vectorised pass); then lists the differences from the Babai codes
    ``xbrow`` without branches: ``djj[:nd]`` the tile columns, ``dval[:nd]`` the scaled
    differences ``s (x - x_b)`` in column order. Returns ``nd``.
    """
    w = xrow.shape[0]
    for jj in range(w):
        xi = xrow[jj]
        xout[jj] = np.int64(xi)
        zq[jj] = srow[jj] * xi + orow[jj]
        ee = trow[jj] - drow[jj] * xi
        cl[jj] += ee * ee
    nd = 0
    for jj in range(w):
        dx = xout[jj] - xbrow[jj]
        djj[nd] = jj
        dval[nd] = srow[jj] * np.float64(dx)
        nd += np.int64(dx != 0)
    return nd


@njit(cache=True, inline="always")
def _aligned(buf, rows, cols):
    """(rows, cols) C-contiguous view of the flat scratch ``buf``, its first element on a
    cache line (``buf`` holds at least ``rows * cols + ALIGN // itemsize`` elements; see
    :func:`~bils._numba._common.aligned_empty`)."""
    off = ((ALIGN - buf.ctypes.data % ALIGN) % ALIGN) // buf.itemsize
    return buf[off:off + rows * cols].reshape((rows, cols))


@njit(cache=True, error_model="numpy")
def _sample_tile(Y, Yg, RT, RS, a, S, Sg, O, Og, LO, HI, xb, xs, cost, j0, w,
                 dcnt, djj, dval, sample, taur, sqr, seedr, nlev, Tbuf, CTbuf, zbuf):
    """One panel ``[a, a + m)`` of one sampled sweep for right-hand sides ``[j0, j0 + w)``.

    ``Yg`` holds the Babai sweep's targets at the panel's start, ``Y[a:e]`` minus the
    updates of the levels ``>= e`` (read for ``e < n``; the first panel starts from ``Y``).
    ``xb``/``xs`` (n, >= w) are the tile's Babai and sample codes,
    ``dcnt`` (n, 1), ``djj``/``dval`` (n, >= w) its per-level difference lists; ``cost``
    (w,) receives the panel's squared residuals.
    """
    m = RT.shape[0]
    e = a + m
    T = _aligned(Tbuf, m, w)
    if e < nlev:
        # R[a:e, e:] @ (Z_sample - Z_babai)[e:] from the recorded differences, per RHS
        CT = _aligned(CTbuf, w, m + CT_PAD)
        CT[...] = 0.0
        _corrections(CT, RS, e, nlev, 0, 0, dcnt, djj, dval)
        for l in range(m):
            for jj in range(w):
                T[l, jj] = Yg[a + l, j0 + jj] - CT[jj, l]
    else:
        for l in range(m):
            for jj in range(w):
                T[l, jj] = Y[a + l, j0 + jj]
    zb = _aligned(zbuf, STEP, w)
    cl = np.zeros(w)
    lbuf = np.empty(_NBUF)
    ubuf = np.empty(_NBUF)
    srow = np.empty(w)
    orow = np.empty(w)
    lorow = np.empty(w)
    hirow = np.empty(w)
    trow = np.empty(w)
    drow = np.empty(w)
    crow = np.empty(w)
    xrow = np.empty(w)
    simple = np.empty(w, dtype=np.bool_)
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
            _klein_row(T[q], rii, srow, orow, lorow, hirow, taur, seedr, sample, i, nlev,
                       trow, drow, crow, xrow, simple)
            for jj in range(w):
                if not simple[jj]:
                    xrow[jj] = klein_pick(crow[jj], drow[jj], at(LO, i, j0 + jj),
                                          at(HI, i, j0 + jj), taur[jj], sqr[jj], seedr[jj],
                                          sample, i, nlev, lbuf, ubuf)
            dcnt[i, 0] = _record_row(xrow, srow, orow, trow, drow, zq, cl, xs[i, :w],
                                     xb[i, :w], djj[i, :w], dval[i, :w])
            rank1(T, RT[q], zq, bot, q, w)
        update_below(T, RT, zb, top, bot, w)
        top = bot
    for jj in range(w):
        cost[jj] += cl[jj]


@njit(cache=True)
def _tile_samples(Y, Yg, RP, poff, pa, pe, S, Sg, O, Og, LO, HI, X, cost, improved, t, width,
                  n_samples, tau, sqrt_tau, seeds, XB, XS, DCNT, DJJ, DVAL, TB, CTB, ZB, tid):
    """Every sampled sweep of tile ``t`` (RHS ``[t width, (t + 1) width)``), each followed
    by the selection: where a sample's cost is below ``cost`` (strictly), its column
    replaces ``X``'s and its cost ``cost``'s (samples in order, as a serial loop would).

    ``X`` holds the Babai codes on entry (copied to the thread's scratch ``XB[tid]``, the
    reference of the difference lists); ``XS``, ``DCNT``, ``DJJ``, ``DVAL``, ``TB``,
    ``CTB``, ``ZB`` are per-thread scratch (row ``tid``). Panel ``p`` is levels
    ``[pa[p], pe[p])``; its block ``R[a:e, a:].T`` sits in ``RP[poff[p]:]``.
    """
    n, k = Y.shape
    j0 = t * width
    j1 = min(k, j0 + width)
    w = j1 - j0
    xb = XB[tid]
    xs = XS[tid]
    dcnt = DCNT[tid]
    djj = DJJ[tid]
    dval = DVAL[tid]
    for i in range(n):
        for jj in range(w):
            xb[i, jj] = X[i, j0 + jj]
    taur = tau[j0:j1]
    sqr = sqrt_tau[j0:j1]
    seedr = seeds[j0:j1]
    cs = np.empty(w)
    cols = np.empty(w, dtype=np.int64)
    for s in range(n_samples):
        cs[:] = 0.0
        for p in range(pa.shape[0]):
            a = pa[p]
            m = pe[p] - a
            blk = RP[poff[p]:poff[p] + (n - a) * m].reshape((n - a, m))
            _sample_tile(Y, Yg, blk[:m], blk[m:], a, S, Sg, O, Og, LO, HI, xb, xs, cs,
                         j0, w, dcnt, djj, dval, s, taur, sqr, seedr, n, TB[tid], CTB[tid], ZB[tid])
        nc = 0
        for jj in range(w):
            if cs[jj] < cost[j0 + jj]:
                cost[j0 + jj] = cs[jj]
                improved[j0 + jj] = True
                cols[nc] = jj
                nc += 1
        if nc > 0:
            for i in range(n):
                for c in range(nc):
                    X[i, j0 + cols[c]] = xs[i, cols[c]]


@njit(cache=True, parallel=True)
def _samples(Y, Yg, RP, poff, pa, pe, S, Sg, O, Og, LO, HI, X, cost, improved, width,
             n_samples, tau, sqrt_tau, seeds, XB, XS, DCNT, DJJ, DVAL, TB, CTB, ZB):
    k = Y.shape[1]
    for t in prange((k + width - 1) // width):
        _tile_samples(Y, Yg, RP, poff, pa, pe, S, Sg, O, Og, LO, HI, X, cost, improved,
                      np.int64(t), width, n_samples, tau, sqrt_tau, seeds, XB, XS, DCNT, DJJ,
                      DVAL, TB, CTB, ZB, numba.get_thread_id())


@njit(cache=True, nogil=True)
def _samples_one(Y, Yg, RP, poff, pa, pe, S, Sg, O, Og, LO, HI, X, cost, improved, width,
                 n_samples, tau, sqrt_tau, seeds, XB, XS, DCNT, DJJ, DVAL, TB, CTB, ZB):
    """``_samples`` in the calling thread (the tiles one after another), without the GIL."""
    k = Y.shape[1]
    for t in range((k + width - 1) // width):
        _tile_samples(Y, Yg, RP, poff, pa, pe, S, Sg, O, Og, LO, HI, X, cost, improved, t,
                      width, n_samples, tau, sqrt_tau, seeds, XB, XS, DCNT, DJJ, DVAL, TB, CTB,
                      ZB, 0)


def _sample_width(k):
    """Tile width of the sampled sweeps: wide, but at least ~4 tasks per 2 threads."""
    w = SAMPLE_TILE
    while w > TILE and (k + w - 1) // w < 8:
        w //= 2
    return w


def klein_panel(block_size):
    """Levels per panel of the numba Klein: the smallest multiple of ``block_size`` that is
    at least :data:`MIN_PANEL`. The result does not depend on it beyond rounding."""
    return block_size * max(1, -(-MIN_PANEL // block_size))


#: Rows of ``R.T`` per task of :func:`_pack` (blocks of ``_PACK_ROWS x 32`` are transposed
#: through the cache).
_PACK_ROWS = 64


@njit(cache=True, parallel=True)
def _pack(R, RP, poff, pa, pe, tp, tq):
    """``RP[poff[p]:].reshape(n - a, m)[q, l] = R[a + l, a + q]`` for the row blocks
    ``q in [tq[i], tq[i] + _PACK_ROWS)`` of panel ``tp[i]``, one task each."""
    n = R.shape[0]
    for i in prange(tp.shape[0]):
        p = tp[i]
        a = pa[p]
        m = pe[p] - a
        blk = RP[poff[p]:poff[p] + (n - a) * m].reshape((n - a, m))
        q0 = tq[i]
        q1 = min(n - a, q0 + _PACK_ROWS)
        for l0 in range(0, m, 32):
            l1 = min(m, l0 + 32)
            for q in range(q0, q1):
                for l in range(l0, l1):
                    blk[q, l] = R[a + l, a + q]


def _packed_panels(R, bounds):
    """``R[a:e, a:].T`` of every panel, C-contiguous, one after another in one read-only
    buffer, and their offsets: rows ``[0, m)`` of a block are the panel's transposed
    diagonal block (the in-panel sweep), rows ``[m, n - a)`` the columns of ``R`` below
    it that the corrections read. Copied in parallel blocks (:func:`_pack`); a plain copy."""
    n = R.shape[0]
    sizes = [(n - a) * (e - a) for a, e in bounds]
    poff = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
    RP = np.empty(int(sum(sizes)))
    pa = np.array([a for a, _ in bounds], dtype=np.int64)
    pe = np.array([e for _, e in bounds], dtype=np.int64)
    tasks = [(p, q0) for p, (a, _) in enumerate(bounds) for q0 in range(0, n - a, _PACK_ROWS)]
    tp = np.array([t[0] for t in tasks], dtype=np.int64)
    tq = np.array([t[1] for t in tasks], dtype=np.int64)
    _pack(readonly(np.ascontiguousarray(R)), RP, poff, pa, pe, tp, tq)
    return readonly(RP), readonly(poff)


def klein_kernel(can, *, n_samples, tau, seeds, block_size, timings=None):
    """Numba kernel of :func:`bils.klein` (same contract as ``_klein_numpy``).

    The Babai point comes from the plain Babai's whole sweep
    (:func:`~bils._numba.babai.whole_sweep`, one parallel launch, no BLAS products), which
    also keeps its targets at the start of every panel of :func:`klein_panel` levels
    (``block_size`` rounded up to a multiple of at least :data:`MIN_PANEL`) and sums its
    cost per panel; the sampled sweeps run in those panels. Like the numba Babai, the
    panels change the result only through rounding.

    The sampled sweeps run in one parallel launch over tiles of right-hand sides: a task
    takes its tile through every sample and panel, and keeps the better point per RHS
    after each sample (in sample order), with per-thread scratch for the tile's codes and
    difference lists.

    ``timings``, a dict, receives seconds per phase: ``convert`` (the transposed panel
    blocks of ``R`` for the samples), ``babai`` (the Babai sweep keeping every panel's
    starting targets), ``samples`` (the sampled sweeps and the selection).
    """
    clock = Clock(timings)
    n, k = can.Y.shape
    xb = np.empty((n, k), dtype=np.int64)
    cost_b = np.empty(k)
    improved = np.zeros(k, dtype=bool)
    if n_samples == 0:
        whole_sweep(can, xb, cost_b, np.dtype(np.float64))
        clock.lap("babai")
    else:
        panel = klein_panel(block_size)
        bounds = panels(n, panel)
        RP, poff = _packed_panels(can.R, bounds)
        clock.lap("convert")
        Yg = np.empty((max(0, n - panel), k))  # targets at every panel start but the first
        whole_sweep(can, xb, cost_b, np.dtype(np.float64), panel=panel, Yg=Yg)
        clock.lap("babai")
        Y = readonly(can.Y)
        S, Sg, O, Og, LO, HI = grids(can)
        tau = np.ascontiguousarray(tau, dtype=np.float64)
        sqrt_t = readonly(np.sqrt(tau))
        tau_r = readonly(tau)
        seeds = readonly(np.ascontiguousarray(seeds, dtype=np.uint64))
        width = _sample_width(k)
        ntiles = (k + width - 1) // width
        parallel = ntiles > 1 and numba.get_num_threads() > 1
        nthr = numba.get_num_threads() if parallel else 1
        pa = readonly(np.array([a for a, _ in bounds], dtype=np.int64))
        pe = readonly(np.array([e for _, e in bounds], dtype=np.int64))
        pad = ALIGN // 8
        scratch = (np.empty((nthr, n, width), dtype=np.int64),  # Babai codes of the tile
                   np.empty((nthr, n, width), dtype=np.int64),  # sample codes
                   np.zeros((nthr, n, 1), dtype=np.int32),  # differences per level
                   np.empty((nthr, n, width), dtype=np.int32),  # their columns
                   np.empty((nthr, n, width)),  # their scaled values
                   np.empty((nthr, panel * width + pad)),  # target tile
                   np.empty((nthr, width * (panel + CT_PAD) + pad)),  # corrections
                   np.empty((nthr, STEP * width + pad)))  # a step's points
        args = (Y, readonly(Yg), RP, poff, pa, pe, S, Sg, O, Og, LO, HI, xb, cost_b, improved, width,
                n_samples, tau_r, sqrt_t, seeds, *scratch)
        with np.errstate(over="ignore"):  # uint64 hashing wraps (NUMBA_DISABLE_JIT)
            if parallel:
                with numba.parallel_chunksize(1):  # dynamic: tiles' work differs
                    _samples(*args)
            else:
                _samples_one(*args)
        clock.lap("samples")
    status = np.full(k, Status.HEURISTIC, dtype=np.int8)
    return xb, cost_b, status, {"n_samples": n_samples, "tau": tau, "improved": improved,
                                "block_size": block_size}
