r"""CUDA K-best: one thread per RHS, its ``K`` survivors' residuals in local memory.

The beam of every right-hand side is advanced level by level exactly as in
:mod:`bils._numba.kbest` (children in zig-zag order by distance to the centre, the
rounded value first on ties; stable selection by partial cost; the Babai child of the
Babai parent always kept; slots without a feasible child stay empty with cost ``inf``).

Levels are processed in panels ``[a, e)`` of ``LAUNCH.kbest_levels`` levels. Each RHS
keeps one *reference* path (beam member 0 at the last panel boundary) densely in
``Zref``; at a panel start one device product gives ``R_{a:e, e:} Zref_{e:}`` for every
RHS, and each member corrects its targets where its path differs from the reference
(walking both parent chains to their common ancestor). Inside the panel a thread keeps
every member's residuals for the panel's remaining levels in local memory
(``2 * KMAX * KBEST_LEVELS`` doubles: current and next beam) and selects the survivors by
insertion into a sorted list of ``K``. Codes and parent pointers live in global memory,
laid out ``(level, member, RHS)`` so that a warp's accesses are coalesced.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from ..result import Status
from ._common import (KBEST_LEVELS, KMAX, LAUNCH, at, box_round, grids, launch, to_device,
                      xp_module)

__all__ = ["kbest_kernel", "panel_kernel", "backtrack_kernel"]

_KERNELS = {}


@cuda.jit(device=True, inline=True)
def _lower_first(c, dn, up, mm):
    """Whether candidate ``dn < mm`` precedes ``up >= mm`` in the children's order."""
    ddn = abs(c - dn)
    dup = abs(c - up)
    if ddn != dup:
        return ddn < dup
    return mm - dn <= up - mm


def panel_kernel():
    """Panel kernel ``(Y, G, has_g, R, a, m, S, O, LO, HI, K, C, xcode, par, nbeam, pcost,
    bslot, Zref)``: one thread per RHS."""
    if "panel" in _KERNELS:
        return _KERNELS["panel"]

    @cuda.jit
    def kern(Y, G, has_g, R, a, m, S, O, LO, HI, K, C, xcode, par, nbeam, pcost, bslot, Zref):
        jg = cuda.grid(1)
        if jg >= Y.shape[1]:
            return
        e = a + m
        n = R.shape[0]
        B = nbeam[jg]
        T = cuda.local.array((2, KMAX, KBEST_LEVELS), np.float64)
        sel_c = cuda.local.array(KMAX, np.float64)
        sel_p = cuda.local.array(KMAX, np.int64)
        sel_r = cuda.local.array(KMAX, np.int64)
        sel_z = cuda.local.array(KMAX, np.float64)
        npc = cuda.local.array(KMAX, np.float64)
        cur = 0
        # targets of every member: reference part from the product, then corrections
        for b in range(B):
            for l in range(m):
                if has_g:
                    T[cur, b, l] = Y[a + l, jg] - G[l, jg]
                else:
                    T[cur, b, l] = Y[a + l, jg]
            if b == 0 or not has_g or pcost[b, jg] == np.inf:
                continue
            ib = b
            ir = 0
            lv = e
            while lv < n and ib != ir:
                xb = xcode[lv, ib, jg]
                xr = xcode[lv, ir, jg]
                if xb != xr:
                    dz = at(S, lv, jg) * np.float64(xb - xr)
                    for l in range(m):
                        T[cur, b, l] -= R[a + l, lv] * dz
                ib = par[lv, ib, jg]
                ir = par[lv, ir, jg]
                lv += 1
        slot = bslot[jg]
        for qq in range(m):
            q = m - 1 - qq
            i = a + q
            rii = R[i, i]
            s = at(S, i, jg)
            o = at(O, i, jg)
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
                pcp = pcost[p, jg]
                if pcp == np.inf:
                    continue  # an empty slot: all its children are infeasible
                t = T[cur, p, q] - rii * o
                c = t / d
                mm = box_round(c, lo, hi)
                zlo = max(mm - w, flo)
                zhi = min(mm + w, fhi)
                nfin = min(ce, np.int64(zhi - zlo) + 1)
                dn = mm - 1.0
                up = mm
                for r in range(nfin):
                    if dn >= zlo and (up > zhi or _lower_first(c, dn, up, mm)):
                        z = dn
                        dn -= 1.0
                    else:
                        z = up
                        up += 1.0
                    ez = t - d * z
                    cc = pcp + ez * ez
                    if p == slot and r == 0:
                        bab_c = cc
                        bab_z = z
                    if cnt == nb and not cc < sel_c[nb - 1]:
                        break  # this parent's later children are farther: no better
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
            for rr in range(nb):
                r = nb - 1 - rr
                if sel_p[r] == slot and sel_r[r] == 0:
                    newslot = r
            slot = newslot
            nxt = 1 - cur
            for r in range(nb):
                p = sel_p[r]
                xcode[i, r, jg] = np.int64(sel_z[r])
                npc[r] = sel_c[r]
                if p < 0:
                    par[i, r, jg] = 0
                    continue
                par[i, r, jg] = p
                zv = s * sel_z[r] + o
                for l in range(q):
                    T[nxt, r, l] = T[cur, p, l] - R[a + l, i] * zv
            for r in range(nb):
                pcost[r, jg] = npc[r]
            cur = nxt
            B = nb
        nbeam[jg] = B
        bslot[jg] = slot
        # member 0 becomes the reference path: rewrite Zref where it differs from the old one
        ib = 0
        for lv in range(a, e):
            Zref[lv, jg] = at(S, lv, jg) * np.float64(xcode[lv, ib, jg]) + at(O, lv, jg)
            ib = par[lv, ib, jg]
        ir = 0
        lv = e
        while lv < n and ib != ir:
            if xcode[lv, ib, jg] != xcode[lv, ir, jg]:
                Zref[lv, jg] = at(S, lv, jg) * np.float64(xcode[lv, ib, jg]) + at(O, lv, jg)
            ib = par[lv, ib, jg]
            ir = par[lv, ir, jg]
            lv += 1

    _KERNELS["panel"] = kern
    return kern


def backtrack_kernel():
    """``(xcode, par, nbeam, pcost, X, cost)``: the best member's path per RHS."""
    if "back" in _KERNELS:
        return _KERNELS["back"]

    @cuda.jit
    def kern(xcode, par, nbeam, pcost, X, cost):
        j = cuda.grid(1)
        if j >= X.shape[1]:
            return
        B = nbeam[j]
        best = 0
        for b in range(1, B):
            if pcost[b, j] < pcost[best, j]:
                best = b
        cost[j] = pcost[best, j]
        ib = best
        for lv in range(X.shape[0]):
            X[lv, j] = xcode[lv, ib, j]
            ib = par[lv, ib, j]

    _KERNELS["back"] = kern
    return kern


def kbest_kernel(can, *, beam_width, n_children):
    """CUDA kernel of :func:`bils.kbest` (same contract as ``_kbest_numpy``)."""
    xp = xp_module()
    K, C = int(beam_width), int(n_children)
    if K > KMAX:
        raise ValueError(f"`beam_width` must be <= {KMAX} with backend='cupy' (the survivors "
                         f"live in local memory), got {K}")
    R = to_device(can.R, np.float64)
    Y = to_device(can.Y, np.float64)
    n, k = Y.shape
    S, O, LO, HI = grids(can)
    levels = max(1, min(LAUNCH.kbest_levels, KBEST_LEVELS))
    xcode = xp.empty((n, K, k), dtype=np.int64)
    par = xp.empty((n, K, k), dtype=np.int32)
    nbeam = xp.ones(k, dtype=np.int64)
    pcost = xp.zeros((K, k))
    bslot = xp.zeros(k, dtype=np.int64)
    Zref = xp.empty((n, k))
    kern = panel_kernel()
    for e in range(n, 0, -levels):
        a = max(0, e - levels)
        has_g = e < n
        G = xp.matmul(R[a:e, e:], Zref[e:]) if has_g else Zref[:1]
        launch(kern, k, Y, G, has_g, R, a, e - a, S, O, LO, HI, K, C, xcode, par, nbeam, pcost,
               bslot, Zref)
    x = xp.empty((n, k), dtype=np.int64)
    cost = xp.empty(k)
    launch(backtrack_kernel(), k, xcode, par, nbeam, pcost, x, cost)
    status = xp.full(k, int(Status.HEURISTIC), dtype=np.int8)
    return x, cost, status, {"beam_width": beam_width, "n_children": n_children}
