r"""Numba K-best: per-RHS beams, blocked so the bulk of the work is one BLAS product.

The beam of every right-hand side is advanced level by level exactly as in
``bils.kbest._kbest_numpy`` (children in zig-zag order by distance to the centre, the
rounded value first on ties; stable selection by partial cost; the Babai child of the
Babai parent always kept; slots without a feasible child stay empty with cost ``inf``).

Blocking. Levels are processed in panels ``[a, e)`` of ``block`` levels. Each RHS keeps
one *reference* path (beam member 0 at the last panel boundary) densely in ``Zref``
(``S * x + O``); all members' paths are stored as codes with parent pointers (int16 when
the box and the beam fit, else int64 and int32). At a panel
start one BLAS product gives ``Y - R_{a:e, e:} Zref_{e:}`` for every RHS; a member's own
targets differ from it only at the levels where its path differs from the reference path,
found by walking both parent chains up to their common ancestor (beam members share long
prefixes, so the walk and the correction are short). Each RHS is handled by one thread
with its own scratch (``prange`` over RHS): no shared mutable state, and results do not
depend on the thread count. The products run with OpenBLAS held at one thread, in fixed
column blocks over Python threads (:class:`~bils._numba._blas.Products`): no OpenBLAS worker spins beside
the numba threads after a product.

Steps. Inside a panel, levels are decided in steps of 16
(:data:`~bils._numba._tiles.STEP`), as in the whole-sweep Babai. At a step's start every
member has its targets for the panel's remaining levels (one row per member); during the
step a member is its ancestor's row plus the points it chose at the step's levels so far;
its targets at the step's remaining levels are kept in a 16-wide row (a new member's is
its parent's minus its new point's term, one per level), so scoring a parent is one load.
After the step one pass gives every member its new row for the levels below (16 updates
per element, the coefficients read in place from the step's 16 contiguous rows of the
panel's transposed diagonal block, four members per pass so each coefficient is loaded
once for four: :func:`_step_rows`), instead of a copy-and-update of every member's row per
level. Each target receives the same operations in the same order as
with one update per level, so codes and costs are bitwise those of the per-level
kernel.

Selection. A parent's children, in zig-zag order, have non-decreasing costs, so the
next beam is the merge of the parents' child sequences: every parent's rounded child is
scored, then the cheapest head (the earlier parent on equal costs) is taken and replaced
by that parent's next child, ``nb`` times. That is the stable order of the reference
(cost, then parent, then rank) with about ``B + K`` children scored and no insertion
shifts (the former insertion sort scored ~26 children and made ~20 shifted insertions
per level for K = 8 on a 3-bit box).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from ..result import Status
from ._blas import Products as _Products
from ._common import Clock, at, box_round, gat, grids, readonly
from ._tiles import STEP

__all__ = ["kbest_kernel"]

#: Levels per panel (rows of the BLAS product). Fewer panels mean fewer reference-path
#: corrections (each walks the members' paths back to the reference); on 4096 x 4096
#: layers 512 was fastest (64: 1.7x, 128: 1.3x, 256: 1.05x, 1024: 1.3x the time).
PANEL = 512
#: Bytes of path storage (codes + parent pointers) per chunk of right-hand sides (fewer,
#: wider chunks mean fewer, larger products).
_PATH_BYTES = 1 << 29
_I16 = np.iinfo(np.int16)
#: Right-hand sides per scheduling chunk of a panel (dynamic scheduling).
_CHUNK = 16
@njit(cache=True, inline="always")
def _lower_first(c, dn, up, mm):
    """Whether candidate ``dn < mm`` precedes ``up >= mm`` in the children's order."""
    ddn = abs(c - dn)
    dup = abs(c - up)
    if ddn != dup:
        return ddn < dup
    return mm - dn <= up - mm


@njit(cache=True, inline="always")
def _rows16(Tn, b, Tb, a, cf, zst, nrows):
    """``Tn[b, l] = Tb[a, l] - sum_r cf[15 - r, l] zst[b, r]``, r = 0..15 in order, for
    ``0 <= l < nrows`` (``cf`` is the step's rows ``RT[bot:top]``, in place: row ``15 - r``
    is level ``top - 1 - r``). Arrays are indexed directly with constant rows of ``cf``
    (one base pointer for the 16 coefficient streams) and ``l`` counts from 0 (provably
    non-negative: no wraparound selects), so the loop vectorises; a loop from a variable
    start runs ~7x slower."""
    z0 = zst[b, 0]
    z1 = zst[b, 1]
    z2 = zst[b, 2]
    z3 = zst[b, 3]
    z4 = zst[b, 4]
    z5 = zst[b, 5]
    z6 = zst[b, 6]
    z7 = zst[b, 7]
    z8 = zst[b, 8]
    z9 = zst[b, 9]
    z10 = zst[b, 10]
    z11 = zst[b, 11]
    z12 = zst[b, 12]
    z13 = zst[b, 13]
    z14 = zst[b, 14]
    z15 = zst[b, 15]
    for l in range(nrows):
        t = Tb[a, l]
        t = t - cf[15, l] * z0
        t = t - cf[14, l] * z1
        t = t - cf[13, l] * z2
        t = t - cf[12, l] * z3
        t = t - cf[11, l] * z4
        t = t - cf[10, l] * z5
        t = t - cf[9, l] * z6
        t = t - cf[8, l] * z7
        t = t - cf[7, l] * z8
        t = t - cf[6, l] * z9
        t = t - cf[5, l] * z10
        t = t - cf[4, l] * z11
        t = t - cf[3, l] * z12
        t = t - cf[2, l] * z13
        t = t - cf[1, l] * z14
        t = t - cf[0, l] * z15
        Tn[b, l] = t


@njit(cache=True, inline="always")
def _rows16x4(Tn, b, Tb, a0, a1, a2, a3, cf, zst, nrows):
    """:func:`_rows16` for members ``b .. b + 3`` (ancestors ``a0 .. a3``) in one pass: each
    coefficient is loaded once for four members (the pass is bound by those loads). Every
    target receives the same operations in the same order as with :func:`_rows16`."""
    z0_0 = zst[b + 0, 0]
    z0_1 = zst[b + 0, 1]
    z0_2 = zst[b + 0, 2]
    z0_3 = zst[b + 0, 3]
    z0_4 = zst[b + 0, 4]
    z0_5 = zst[b + 0, 5]
    z0_6 = zst[b + 0, 6]
    z0_7 = zst[b + 0, 7]
    z0_8 = zst[b + 0, 8]
    z0_9 = zst[b + 0, 9]
    z0_10 = zst[b + 0, 10]
    z0_11 = zst[b + 0, 11]
    z0_12 = zst[b + 0, 12]
    z0_13 = zst[b + 0, 13]
    z0_14 = zst[b + 0, 14]
    z0_15 = zst[b + 0, 15]
    z1_0 = zst[b + 1, 0]
    z1_1 = zst[b + 1, 1]
    z1_2 = zst[b + 1, 2]
    z1_3 = zst[b + 1, 3]
    z1_4 = zst[b + 1, 4]
    z1_5 = zst[b + 1, 5]
    z1_6 = zst[b + 1, 6]
    z1_7 = zst[b + 1, 7]
    z1_8 = zst[b + 1, 8]
    z1_9 = zst[b + 1, 9]
    z1_10 = zst[b + 1, 10]
    z1_11 = zst[b + 1, 11]
    z1_12 = zst[b + 1, 12]
    z1_13 = zst[b + 1, 13]
    z1_14 = zst[b + 1, 14]
    z1_15 = zst[b + 1, 15]
    z2_0 = zst[b + 2, 0]
    z2_1 = zst[b + 2, 1]
    z2_2 = zst[b + 2, 2]
    z2_3 = zst[b + 2, 3]
    z2_4 = zst[b + 2, 4]
    z2_5 = zst[b + 2, 5]
    z2_6 = zst[b + 2, 6]
    z2_7 = zst[b + 2, 7]
    z2_8 = zst[b + 2, 8]
    z2_9 = zst[b + 2, 9]
    z2_10 = zst[b + 2, 10]
    z2_11 = zst[b + 2, 11]
    z2_12 = zst[b + 2, 12]
    z2_13 = zst[b + 2, 13]
    z2_14 = zst[b + 2, 14]
    z2_15 = zst[b + 2, 15]
    z3_0 = zst[b + 3, 0]
    z3_1 = zst[b + 3, 1]
    z3_2 = zst[b + 3, 2]
    z3_3 = zst[b + 3, 3]
    z3_4 = zst[b + 3, 4]
    z3_5 = zst[b + 3, 5]
    z3_6 = zst[b + 3, 6]
    z3_7 = zst[b + 3, 7]
    z3_8 = zst[b + 3, 8]
    z3_9 = zst[b + 3, 9]
    z3_10 = zst[b + 3, 10]
    z3_11 = zst[b + 3, 11]
    z3_12 = zst[b + 3, 12]
    z3_13 = zst[b + 3, 13]
    z3_14 = zst[b + 3, 14]
    z3_15 = zst[b + 3, 15]
    for l in range(nrows):
        t0 = Tb[a0, l]
        t1 = Tb[a1, l]
        t2 = Tb[a2, l]
        t3 = Tb[a3, l]
        c = cf[15, l]
        t0 = t0 - c * z0_0
        t1 = t1 - c * z1_0
        t2 = t2 - c * z2_0
        t3 = t3 - c * z3_0
        c = cf[14, l]
        t0 = t0 - c * z0_1
        t1 = t1 - c * z1_1
        t2 = t2 - c * z2_1
        t3 = t3 - c * z3_1
        c = cf[13, l]
        t0 = t0 - c * z0_2
        t1 = t1 - c * z1_2
        t2 = t2 - c * z2_2
        t3 = t3 - c * z3_2
        c = cf[12, l]
        t0 = t0 - c * z0_3
        t1 = t1 - c * z1_3
        t2 = t2 - c * z2_3
        t3 = t3 - c * z3_3
        c = cf[11, l]
        t0 = t0 - c * z0_4
        t1 = t1 - c * z1_4
        t2 = t2 - c * z2_4
        t3 = t3 - c * z3_4
        c = cf[10, l]
        t0 = t0 - c * z0_5
        t1 = t1 - c * z1_5
        t2 = t2 - c * z2_5
        t3 = t3 - c * z3_5
        c = cf[9, l]
        t0 = t0 - c * z0_6
        t1 = t1 - c * z1_6
        t2 = t2 - c * z2_6
        t3 = t3 - c * z3_6
        c = cf[8, l]
        t0 = t0 - c * z0_7
        t1 = t1 - c * z1_7
        t2 = t2 - c * z2_7
        t3 = t3 - c * z3_7
        c = cf[7, l]
        t0 = t0 - c * z0_8
        t1 = t1 - c * z1_8
        t2 = t2 - c * z2_8
        t3 = t3 - c * z3_8
        c = cf[6, l]
        t0 = t0 - c * z0_9
        t1 = t1 - c * z1_9
        t2 = t2 - c * z2_9
        t3 = t3 - c * z3_9
        c = cf[5, l]
        t0 = t0 - c * z0_10
        t1 = t1 - c * z1_10
        t2 = t2 - c * z2_10
        t3 = t3 - c * z3_10
        c = cf[4, l]
        t0 = t0 - c * z0_11
        t1 = t1 - c * z1_11
        t2 = t2 - c * z2_11
        t3 = t3 - c * z3_11
        c = cf[3, l]
        t0 = t0 - c * z0_12
        t1 = t1 - c * z1_12
        t2 = t2 - c * z2_12
        t3 = t3 - c * z3_12
        c = cf[2, l]
        t0 = t0 - c * z0_13
        t1 = t1 - c * z1_13
        t2 = t2 - c * z2_13
        t3 = t3 - c * z3_13
        c = cf[1, l]
        t0 = t0 - c * z0_14
        t1 = t1 - c * z1_14
        t2 = t2 - c * z2_14
        t3 = t3 - c * z3_14
        c = cf[0, l]
        t0 = t0 - c * z0_15
        t1 = t1 - c * z1_15
        t2 = t2 - c * z2_15
        t3 = t3 - c * z3_15
        Tn[b + 0, l] = t0
        Tn[b + 1, l] = t1
        Tn[b + 2, l] = t2
        Tn[b + 3, l] = t3


@njit(cache=True)
def _step_rows(Tn, Tb, anc, zst, pc, B, RT, top, bot):
    """Targets of rows ``[0, bot)`` after the step of levels ``[bot, top)`` for every member.

    Member ``b``'s new row is its ancestor's row ``Tb[anc[b]]`` minus the step's updates
    ``RT[lv, l] z_b(lv)`` in level order (``zst[b, r]`` is level ``top - 1 - r``), the same
    operations in the same order as one rank-1 update per level, so the results do not
    depend on the step. The coefficients are read in place from the step's rows
    ``RT[bot:top]`` (a copy to a scratch block first cost ~20 % more: one more pass over
    16 rows of ``RT`` per step).
    Empty members (cost ``inf``) get rows too when they fall in a block of four (their step
    points are zeros; their costs keep them out of every selection), otherwise skipped.
    """
    ns = top - bot
    b0 = 0
    if ns == STEP:  # members four at a time (empty ones too: their zst rows are zeros)
        cf = RT[bot:top]  # in place: row STEP - 1 - r is level top - 1 - r
        while b0 + 4 <= B:
            _rows16x4(Tn, b0, Tb, anc[b0], anc[b0 + 1], anc[b0 + 2], anc[b0 + 3], cf, zst, bot)
            b0 += 4
    for b in range(b0, B):
        if pc[b] == np.inf:
            continue
        ab = anc[b]
        if ns == STEP:
            _rows16(Tn, b, Tb, ab, RT[bot:top], zst, bot)
        else:
            for l in range(bot):
                t = Tb[ab, l]
                for r in range(ns):
                    t = t - RT[top - 1 - r, l] * zst[b, r]
                Tn[b, l] = t


@njit(cache=True)
def _panel_rhs(Y, Gc, has_g, RT, RS, a, S, Sg, O, Og, LO, HI, K, C, jg, jj,
               xcode, par, nbeam, pcost, bslot, Zref):
    """Advance the beam of one RHS (global column ``jg``, chunk column ``jj``) over a panel."""
    m = RT.shape[0]
    e = a + m
    n = xcode.shape[1]
    B = nbeam[jj]
    Tb = np.empty((K, m))
    Tn = np.empty((K, m))
    # targets of every member: reference part from the BLAS product (read once, strided,
    # then copied), then corrections
    for l in range(m):
        Tb[0, l] = Y[a + l, jg] - Gc[l, jj] if has_g else Y[a + l, jg]
    for b in range(1, B):
        for l in range(m):
            Tb[b, l] = Tb[0, l]
        if not has_g or pcost[jj, b] == np.inf:
            continue
        ib = b
        ir = 0
        lv = e
        while lv < n and ib != ir:
            xb = np.int64(xcode[jj, lv, ib])
            xr = np.int64(xcode[jj, lv, ir])
            if xb != xr:
                dz = gat(S, Sg, lv, jg) * np.float64(xb - xr)
                row = RS[lv - e]
                for l in range(m):
                    Tb[b, l] -= row[l] * dz
            ib = par[jj, lv, ib]
            ir = par[jj, lv, ir]
            lv += 1
    pc = pcost[jj]
    slot = bslot[jj]
    sel_c = np.empty(K)
    sel_k = np.empty(K, dtype=np.int64)  # candidate key p * C + rank (-1: empty slot)
    sel_p = np.empty(K, dtype=np.int64)  # its parent
    sel_z = np.empty(K)  # its point
    # per parent: its next child (cost hc, point hz, rank hr), its target t, centre,
    # rounded value, window [hlo, hhi] of hn children and the zig-zag frontier hdn/hup
    hc = np.empty(K)
    hz = np.empty(K)
    hr = np.empty(K, dtype=np.int64)
    hn = np.empty(K, dtype=np.int64)
    ht = np.empty(K)
    hcen = np.empty(K)
    hm = np.empty(K)
    hlo = np.empty(K)
    hhi = np.empty(K)
    hdn = np.empty(K)
    hup = np.empty(K)
    npc = np.empty(K)
    # members' targets are kept per step of STEP levels: ``Tb[anc[b]]`` holds member b's
    # targets as of the step's start (its ancestor's row), ``zst[b, :ns]`` the points it
    # chose at the step's first ns levels (for the rows below the step, :func:`_step_rows`)
    anc = np.empty(K, dtype=np.int64)
    anc_n = np.empty(K, dtype=np.int64)
    # ct[r, q - bot] = RT[top - 1 - r, q]: in-step coefficients, row r (the step's r-th
    # decided level) contiguous, so a new member's row update reads it in order (no gather)
    ct = np.empty((STEP, STEP))
    zst = np.empty((K, STEP))
    zst_n = np.empty((K, STEP))
    # tst[b, u]: member b's target at level bot + u of the current step, the step's decided
    # levels already subtracted (in level order, as the on-the-fly sum would): a parent's
    # target is one load, and a new member's row is its parent's minus one term per level
    tst = np.empty((K, STEP))
    tst_n = np.empty((K, STEP))
    for b in range(K):
        anc[b] = b
    top = m
    while top > 0:
        bot = max(0, top - STEP)
        for r in range(top - 1 - bot):
            for u in range(top - 1 - bot - r):
                ct[r, u] = RT[top - 1 - r, bot + u]
        for b in range(B):  # anc is the identity at a step's start
            for u in range(top - bot):
                tst[b, u] = Tb[b, bot + u]
        for q in range(top - 1, bot - 1, -1):
            ns = top - 1 - q  # levels of this step decided before q
            i = a + q
            rii = RT[q, q]
            s = gat(S, Sg, i, jg)
            o = gat(O, Og, i, jg)
            lo = at(LO, i, jg)
            hi = at(HI, i, jg)
            flo = np.float64(lo)
            fhi = np.float64(hi)
            d = rii * s
            w = min(C - 1, hi - lo)
            ce = min(C, 2 * w + 1)
            nb = min(K, B * ce)
            # every parent's children come in zig-zag order with non-decreasing cost:
            # the beam is the merge of these sequences, nb heads taken in (cost, key)
            # order (key = parent * C + rank, the reference's stable order)
            uq = q - bot
            for p in range(B):  # branch-free over the parents (empty slots: cost inf below)
                t = tst[p, uq]
                t = t - rii * o
                c = t / d
                mm = box_round(c, lo, hi)
                ht[p] = t
                hcen[p] = c
                hm[p] = mm
                hlo[p] = max(mm - w, flo)
                hhi[p] = min(mm + w, fhi)
                hn[p] = min(ce, np.int64(hhi[p] - hlo[p]) + 1)
                hr[p] = 0
                hdn[p] = mm - 1.0
                hup[p] = mm + 1.0
                ez = t - d * mm  # child 0: the rounded value
                hz[p] = mm
                hc[p] = np.inf if pc[p] == np.inf else pc[p] + ez * ez
            bab_c = hc[slot]
            bab_z = hz[slot]
            cnt = 0
            while cnt < nb:
                best = -1
                bc = np.inf
                for p in range(B):
                    if hc[p] < bc:  # strict: on equal costs the earlier parent wins
                        bc = hc[p]
                        best = p
                if best < 0:
                    break  # every parent's children are taken
                p = best
                sel_c[cnt] = bc
                sel_k[cnt] = p * C + hr[p]
                sel_p[cnt] = p
                sel_z[cnt] = hz[p]
                cnt += 1
                r = hr[p] + 1  # the parent's next child in zig-zag order
                hr[p] = r
                if r >= hn[p]:
                    hc[p] = np.inf
                    continue
                dn = hdn[p]
                up = hup[p]
                mm = hm[p]
                if dn >= hlo[p] and (up > hhi[p] or _lower_first(hcen[p], dn, up, mm)):
                    z = dn
                    hdn[p] = dn - 1.0
                else:
                    z = up
                    hup[p] = up + 1.0
                ez = ht[p] - d * z
                hz[p] = z
                hc[p] = pc[p] + ez * ez
            bkey = slot * C  # the Babai child of the Babai parent
            if cnt == nb:
                present = False
                for r in range(nb):
                    if sel_k[r] == bkey:
                        present = True
                if not present:
                    sel_c[nb - 1] = bab_c
                    sel_k[nb - 1] = bkey
                    sel_p[nb - 1] = slot
                    sel_z[nb - 1] = bab_z
            else:
                for r in range(cnt, nb):  # empty slots (fewer feasible children than nb)
                    sel_c[r] = np.inf
                    sel_k[r] = -1
            newslot = 0
            for r in range(nb - 1, -1, -1):
                if sel_k[r] == bkey:
                    newslot = r
            slot = newslot
            for r in range(nb):
                key = sel_k[r]
                npc[r] = sel_c[r]
                if key < 0:
                    xcode[jj, i, r] = 0
                    par[jj, i, r] = 0
                    anc_n[r] = 0
                    for u in range(STEP):
                        zst_n[r, u] = 0.0
                        tst_n[r, u] = 0.0
                    continue
                p = sel_p[r]
                zr = sel_z[r]
                xcode[jj, i, r] = np.int64(zr)
                par[jj, i, r] = p
                anc_n[r] = anc[p]
                for u in range(ns):
                    zst_n[r, u] = zst[p, u]
                zv = s * zr + o
                zst_n[r, ns] = zv
                for u in range(q - bot):
                    tst_n[r, u] = tst[p, u] - ct[ns, u] * zv
            for r in range(nb):
                pc[r] = npc[r]
            anc, anc_n = anc_n, anc
            zst, zst_n = zst_n, zst
            tst, tst_n = tst_n, tst
            B = nb
        if bot > 0:  # rows below the step: each member's STEP updates in one pass
            _step_rows(Tn, Tb, anc, zst, pc, B, RT, top, bot)
            Tb, Tn = Tn, Tb
            for b in range(B):
                anc[b] = b
        top = bot
    nbeam[jj] = B
    bslot[jj] = slot
    # member 0 becomes the reference path: rewrite Zref where it differs from the old one
    ib = 0
    for lv in range(a, e):
        Zref[lv, jj] = gat(S, Sg, lv, jg) * np.float64(xcode[jj, lv, ib]) + gat(O, Og, lv, jg)
        ib = par[jj, lv, ib]
    ir = 0
    lv = e
    while lv < n and ib != ir:
        if xcode[jj, lv, ib] != xcode[jj, lv, ir]:
            Zref[lv, jj] = gat(S, Sg, lv, jg) * np.float64(xcode[jj, lv, ib]) + gat(O, Og, lv, jg)
        ib = par[jj, lv, ib]
        ir = par[jj, lv, ir]
        lv += 1


@njit(cache=True, parallel=True)
def _panel(Y, Gc, has_g, RT, RS, a, S, Sg, O, Og, LO, HI, K, C, j0, xcode, par, nbeam, pcost, bslot,
           Zref):
    for jj in prange(xcode.shape[0]):
        _panel_rhs(Y, Gc, has_g, RT, RS, a, S, Sg, O, Og, LO, HI, K, C, j0 + np.int64(jj),
                   np.int64(jj), xcode, par, nbeam, pcost, bslot, Zref)


@njit(cache=True)
def _panel_one(Y, Gc, has_g, RT, RS, a, S, Sg, O, Og, LO, HI, K, C, j0, xcode, par, nbeam, pcost, bslot,
               Zref):
    """``_panel`` for a single RHS, without a parallel launch."""
    _panel_rhs(Y, Gc, has_g, RT, RS, a, S, Sg, O, Og, LO, HI, K, C, j0, 0, xcode, par, nbeam, pcost,
               bslot, Zref)


@njit(cache=True, parallel=True)
def _backtrack(xcode, par, nbeam, pcost, j0, X, cost):
    kc, n, _ = xcode.shape
    for jj in prange(kc):
        B = nbeam[jj]
        best = 0
        for b in range(1, B):
            if pcost[jj, b] < pcost[jj, best]:
                best = b
        cost[j0 + jj] = pcost[jj, best]
        ib = best
        for lv in range(n):
            X[lv, j0 + jj] = xcode[jj, lv, ib]
            ib = par[jj, lv, ib]


def kbest_kernel(can, *, beam_width, n_children, timings=None):
    """Numba kernel of :func:`bils.kbest` (same contract as ``_kbest_numpy``).

    ``timings``, a dict, receives seconds per phase: ``convert`` (grids, transposed panel
    copies of ``R``, path storage), ``product`` (the reference paths' BLAS products),
    ``panel`` (the beams' sweeps over each panel), ``backtrack`` (best member's codes).
    """
    clock = Clock(timings)
    R = can.R
    Y = readonly(can.Y)
    n, k = Y.shape
    K, C = int(beam_width), int(n_children)
    S, Sg, O, Og, LO, HI = grids(can)
    x = np.empty((n, k), dtype=np.int64)
    cost = np.empty(k)
    # path storage: int16 codes and parent pointers when the box and the beam fit (4 bytes
    # per member and level instead of 12: a third of the memory written and faulted in)
    narrow = K <= _I16.max and (LO.size == 0 or (LO.min() >= _I16.min and HI.max() <= _I16.max))
    cdt, pdt = (np.int16, np.int16) if narrow else (np.int64, np.int32)
    per = (np.dtype(cdt).itemsize + np.dtype(pdt).itemsize) * n * K
    kc = int(max(1, min(k, _PATH_BYTES // per)))
    panels = [(max(0, e - PANEL), e) for e in range(n, 0, -PANEL)]
    slabs = [readonly(np.ascontiguousarray(R[a:e, e:].T)) for a, e in panels]
    diags = [readonly(np.ascontiguousarray(R[a:e, a:e].T)) for a, e in panels]
    with _Products(numba.get_num_threads()) as prod:
        for j0 in range(0, k, kc):
            _chunk(Y, R, K, C, S, Sg, O, Og, LO, HI, j0, min(k, j0 + kc), panels, slabs, diags,
                   x, cost, clock, prod, cdt, pdt)
    status = np.full(k, Status.HEURISTIC, dtype=np.int8)
    return x, cost, status, {"beam_width": beam_width, "n_children": n_children}


def _chunk(Y, R, K, C, S, Sg, O, Og, LO, HI, j0, j1, panels, slabs, diags, x, cost, clock, prod, cdt,
           pdt):
    """Right-hand sides ``[j0, j1)``: every panel's product and beam sweep, then the backtrack."""
    n = Y.shape[0]
    w = j1 - j0
    xcode = np.empty((w, n, K), dtype=cdt)
    par = np.empty((w, n, K), dtype=pdt)
    nbeam = np.ones(w, dtype=np.int64)
    pcost = np.zeros((w, K))
    bslot = np.zeros(w, dtype=np.int64)
    Zref = np.empty((n, w))
    Gc = np.empty((min(PANEL, n), w))
    clock.lap("convert")
    for (a, e), RS, RT in zip(panels, slabs, diags):
        Gp = Gc[: e - a]
        has_g = e < n
        if has_g:
            prod.matmul(R[a:e, e:], Zref[e:], Gp)
        clock.lap("product")
        if w > 1:
            with numba.parallel_chunksize(_CHUNK):  # work per RHS varies (corrections)
                _panel(Y, readonly(Gp), has_g, RT, RS, a, S, Sg, O, Og, LO, HI, K, C, j0, xcode,
                       par, nbeam, pcost, bslot, Zref)
        else:
            _panel_one(Y, readonly(Gp), has_g, RT, RS, a, S, Sg, O, Og, LO, HI, K, C, j0, xcode, par,
                       nbeam, pcost, bslot, Zref)
        clock.lap("panel")
    _backtrack(xcode, par, nbeam, pcost, j0, x, cost)
    clock.lap("backtrack")
