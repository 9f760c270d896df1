r"""Numba K-best: per-RHS beams, blocked so the bulk of the work is one BLAS product.

The beam of every right-hand side is advanced level by level exactly as in
``bils.kbest._kbest_numpy`` (children in zig-zag order by distance to the centre, the
rounded value first on ties; stable selection by partial cost; the Babai child of the
Babai parent always kept; slots without a feasible child stay empty with cost ``inf``).

Blocking. Levels are processed in panels ``[a, e)`` of ``block`` levels. Each RHS keeps
one *reference* path (beam member 0 at the last panel boundary) densely in ``Zref``
(``S * x + O``); all members' paths are stored as codes with parent pointers. At a panel
start one BLAS product gives ``Y - R_{a:e, e:} Zref_{e:}`` for every RHS; a member's own
targets differ from it only at the levels where its path differs from the reference path,
found by walking both parent chains up to their common ancestor (beam members share long
prefixes, so the walk and the correction are short). Inside the panel each member keeps
its residual for the panel's remaining levels (right-looking updates, vectorised over
levels). Each RHS is handled by one thread with its own scratch (``prange`` over RHS): no
shared mutable state, and results do not depend on the thread count.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from ..result import Status
from ._common import at, box_round, gat, grids, readonly

__all__ = ["kbest_kernel"]

#: Levels per panel (rows of the BLAS product). Fewer panels mean fewer reference-path
#: corrections (each walks the members' paths back to the reference); on 4096 x 4096
#: layers 512 was fastest (64: 1.7x, 128: 1.3x, 256: 1.05x, 1024: 1.3x the time).
PANEL = 512
#: Bytes of path storage (codes + parent pointers) per chunk of right-hand sides (fewer,
#: wider chunks mean fewer, larger products).
_PATH_BYTES = 1 << 29
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
    # targets of every member: reference part from the BLAS product, then corrections
    for b in range(B):
        for l in range(m):
            Tb[b, l] = Y[a + l, jg] - Gc[l, jj] if has_g else Y[a + l, jg]
        if b == 0 or not has_g or pcost[jj, b] == np.inf:
            continue
        ib = b
        ir = 0
        lv = e
        while lv < n and ib != ir:
            xb = xcode[jj, lv, ib]
            xr = xcode[jj, lv, ir]
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
    sel_p = np.empty(K, dtype=np.int64)
    sel_r = np.empty(K, dtype=np.int64)
    sel_z = np.empty(K)
    npc = np.empty(K)
    for q in range(m - 1, -1, -1):
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
        cnt = 0
        bab_c = 0.0
        bab_z = 0.0
        for p in range(B):
            if pc[p] == np.inf:
                continue  # an empty slot: all its children are infeasible
            t = Tb[p, q] - rii * o
            c = t / d
            mm = box_round(c, lo, hi)
            zlo = max(mm - w, flo)
            zhi = min(mm + w, fhi)
            nfin = min(ce, np.int64(zhi - zlo) + 1)
            dn = mm - 1.0
            up = mm
            for r in range(nfin):
                # zig-zag by distance; on exact ties the offset listed first in
                # 0, -1, +1, -2, +2, ... wins (so child 0 is the rounded value)
                if dn >= zlo and (up > zhi or _lower_first(c, dn, up, mm)):
                    z = dn
                    dn -= 1.0
                else:
                    z = up
                    up += 1.0
                ez = t - d * z
                cc = pc[p] + ez * ez
                if p == slot and r == 0:
                    bab_c = cc
                    bab_z = z
                if cnt == nb and not cc < sel_c[nb - 1]:
                    break  # this parent's later children are farther: no better
                # insert after entries of equal cost (stable order: parent, then rank)
                pos = cnt if cnt < nb else nb - 1
                while pos > 0 and sel_c[pos - 1] > cc:
                    if pos < nb:
                        sel_c[pos] = sel_c[pos - 1]
                        sel_p[pos] = sel_p[pos - 1]
                        sel_r[pos] = sel_r[pos - 1]
                        sel_z[pos] = sel_z[pos - 1]
                    pos -= 1
                sel_c[pos] = cc
                sel_p[pos] = p
                sel_r[pos] = r
                sel_z[pos] = z
                if cnt < nb:
                    cnt += 1
        if cnt == nb:
            present = False
            for r in range(nb):
                if sel_p[r] == slot and sel_r[r] == 0:
                    present = True
            if not present:
                sel_c[nb - 1] = bab_c
                sel_p[nb - 1] = slot
                sel_r[nb - 1] = 0
                sel_z[nb - 1] = bab_z
        else:
            for r in range(cnt, nb):  # empty slots (fewer feasible children than nb)
                sel_c[r] = np.inf
                sel_p[r] = -1
                sel_r[r] = -1
                sel_z[r] = 0.0
        newslot = 0
        for r in range(nb - 1, -1, -1):
            if sel_p[r] == slot and sel_r[r] == 0:
                newslot = r
        slot = newslot
        rq = RT[q]
        for r in range(nb):
            p = sel_p[r]
            xcode[jj, i, r] = np.int64(sel_z[r])
            npc[r] = sel_c[r]
            if p < 0:
                par[jj, i, r] = 0
                continue
            par[jj, i, r] = p
            zv = s * sel_z[r] + o
            for l in range(q):
                Tn[r, l] = Tb[p, l] - rq[l] * zv
        for r in range(nb):
            pc[r] = npc[r]
        Tb, Tn = Tn, Tb
        B = nb
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


def kbest_kernel(can, *, beam_width, n_children):
    """Numba kernel of :func:`bils.kbest` (same contract as ``_kbest_numpy``)."""
    R = can.R
    Y = readonly(can.Y)
    n, k = Y.shape
    K, C = int(beam_width), int(n_children)
    S, Sg, O, Og, LO, HI = grids(can)
    x = np.empty((n, k), dtype=np.int64)
    cost = np.empty(k)
    kc = int(max(1, min(k, _PATH_BYTES // (12 * n * K))))
    panels = [(max(0, e - PANEL), e) for e in range(n, 0, -PANEL)]
    slabs = [readonly(np.ascontiguousarray(R[a:e, e:].T)) for a, e in panels]
    diags = [readonly(np.ascontiguousarray(R[a:e, a:e].T)) for a, e in panels]
    for j0 in range(0, k, kc):
        j1 = min(k, j0 + kc)
        w = j1 - j0
        xcode = np.empty((w, n, K), dtype=np.int64)
        par = np.empty((w, n, K), dtype=np.int32)
        nbeam = np.ones(w, dtype=np.int64)
        pcost = np.zeros((w, K))
        bslot = np.zeros(w, dtype=np.int64)
        Zref = np.empty((n, w))
        Gc = np.empty((min(PANEL, n), w))
        for (a, e), RS, RT in zip(panels, slabs, diags):
            Gp = Gc[: e - a]
            has_g = e < n
            if has_g:
                np.matmul(R[a:e, e:], Zref[e:], out=Gp)
            if w > 1:
                with numba.parallel_chunksize(_CHUNK):  # work per RHS varies (corrections)
                    _panel(Y, readonly(Gp), has_g, RT, RS, a, S, Sg, O, Og, LO, HI, K, C, j0, xcode,
                           par, nbeam, pcost, bslot, Zref)
            else:
                _panel_one(Y, readonly(Gp), has_g, RT, RS, a, S, Sg, O, Og, LO, HI, K, C, j0, xcode, par,
                           nbeam, pcost, bslot, Zref)
        _backtrack(xcode, par, nbeam, pcost, j0, x, cost)
    status = np.full(k, Status.HEURISTIC, dtype=np.int8)
    return x, cost, status, {"beam_width": beam_width, "n_children": n_children}
