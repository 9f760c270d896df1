r"""CUDA box Babai: per block of levels one kernel rounds every RHS, then one product.

Levels are decided from ``n - 1`` down to ``0`` in blocks ``[a, e)`` of
``min(block_size, LAUNCH.levels, MAX_LEVELS)`` levels (128). For each block

.. math::

    G = R_{a:e,\,e:}\, Z_{e:}, \qquad Z = S \circ X + O

is one device product (``xp.matmul``: cuBLAS), ``Z`` holding the decided points with
their offset. Then one kernel decides the block for every right-hand side: one thread per
RHS, the block of :math:`R` in shared memory (loaded once per CUDA block, read as a
broadcast by all threads: the packed upper triangle of the 128 levels in float32; in
float64, which would need 66 KiB, two 64-level sub-blocks, each triangle and the square
coupling them loaded in turn), the block's decided points in local memory. Level ``i``
forms

.. math::

    t_i = (Y_i - G_i) - \sum_{l = e-1}^{i+1} R_{il} z_l - R_{ii} o_i,\quad
    x_i = \mathrm{clip}(\lfloor t_i / (R_{ii} s_i) + \tfrac12 \rfloor, lo_i, hi_i),

subtracting the in-block terms from the highest level down: the same operations, in the
same order, as the rank-1 updates of :mod:`bils._numba.babai`. Cost: :math:`n^2 k` flops
in the products and :math:`n\,b\,k` in the kernels.

Klein (:mod:`bils._cuda.klein`) runs the same kernel with the decision replaced by Klein's
draw, on ``n_samples * k`` columns at once.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from ..result import Status
from ._common import (LAUNCH, MAX_LEVELS, SHARED_LEVELS, at, box_round, grids, launch, to_device,
                      xp_module)

__all__ = ["babai_kernel", "sweep", "sweep_kernel", "block_levels", "sub_levels"]

_KERNELS = {}


def sweep_kernel(dtype, sampled=False):
    """The block kernel for working ``dtype`` (float32/float64); ``sampled``: Klein's draw.

    Signature ``(Y, G, has_g, R, a, m, sub, S, O, LO, HI, X, Z, cost, tau, sqrt_tau,
    seeds, k_rhs, s0, nlev)``: decides levels ``[a, a + m)`` (``m <= MAX_LEVELS``) in
    sub-blocks of ``sub <= SHARED_LEVELS[dtype]`` levels, top first; ``Y`` (n, k_rhs)
    float64; ``G`` (>= m, kc) and ``R`` (n, n), ``Z`` (n, kc) in ``dtype``; ``X`` (n, kc)
    int64; ``cost`` (kc,) float64; grids compact; ``tau``, ``sqrt_tau`` (k_rhs,) float64
    and ``seeds`` (k_rhs,) uint64 (read only when ``sampled``). Column ``c`` of ``X`` is
    RHS ``c % k_rhs`` of sample ``s0 + c // k_rhs``. Launch: one thread per column, any
    number of threads per block (all of them help load ``R`` into shared memory).

    Per sub-block ``[lo, hi)`` each thread takes its targets ``Y - G``, subtracts the
    decided sub-blocks above it (their coupling rectangle of ``R`` loaded into shared
    memory in turn, top first), then decides the sub-block with its packed triangle in
    shared memory. Each target sees the updates of the decided levels from the highest
    down, as in :mod:`bils._numba.babai`.
    """
    dtype = np.dtype(dtype)
    key = (dtype, bool(sampled))
    if key in _KERNELS:
        return _KERNELS[key]
    cast = np.float32 if dtype == np.float32 else np.float64
    SC = SHARED_LEVELS[dtype]
    NB = SC * (SC + 1) // 2
    if MAX_LEVELS > SC:  # room for a coupling rectangle between sub-blocks
        NB = max(NB, SC * SC)
    ML = MAX_LEVELS
    if sampled:
        from .klein import NBUF, klein_pick
    else:  # never called: a placeholder of the same arity
        NBUF = 1

        @cuda.jit(device=True, inline=True)
        def klein_pick(c, d, lo, hi, tau, sqrt_tau, seed, sample, level, n, lbuf, ubuf):
            return c

    @cuda.jit
    def kern(Y, G, has_g, R, a, m, sub, S, O, LO, HI, X, Z, cost, tau, sqrt_tau, seeds, k_rhs,
             s0, nlev):
        sh = cuda.shared.array(NB, dtype)
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        c = cuda.grid(1)
        active = c < X.shape[1]
        j = c % k_rhs
        smp = s0 + c // k_rhs
        zl = cuda.local.array(ML, dtype)  # decided points of the block (index q)
        tl = cuda.local.array(SC, dtype)  # targets of the current sub-block
        lbuf = cuda.local.array(NBUF, np.float64)
        ubuf = cuda.local.array(NBUF, np.float64)
        cl = 0.0
        nsb = (m + sub - 1) // sub
        for sbi in range(nsb):
            hq = m - sbi * sub  # sub-block [lq, hq) of the block, top first
            lq = max(0, hq - sub)
            w = hq - lq
            if active:
                for qq in range(w):
                    i = a + lq + qq
                    if has_g:
                        tl[qq] = cast(Y[i, j] - G[lq + qq, c])
                    else:
                        tl[qq] = cast(Y[i, j])
            for pbi in range(sbi):  # decided sub-blocks above, top first
                ph = m - pbi * sub
                pl = ph - sub
                cuda.syncthreads()
                for idx in range(tid, w * sub, nt):
                    r = idx // sub
                    l = idx - r * sub
                    sh[idx] = R[a + lq + r, a + pl + l]
                cuda.syncthreads()
                if active:
                    for qq in range(w):
                        t = tl[qq]
                        for ll in range(sub):
                            l = sub - 1 - ll
                            t = t - sh[qq * sub + l] * zl[pl + l]
                        tl[qq] = t
            cuda.syncthreads()
            for idx in range(tid, w * w, nt):
                q = idx // w
                l = idx - q * w
                if l >= q:
                    sh[q * (2 * SC - q + 1) // 2 + (l - q)] = R[a + lq + q, a + lq + l]
            cuda.syncthreads()
            if active:
                for qq in range(w):
                    q = w - 1 - qq
                    i = a + lq + q
                    base = q * (2 * SC - q + 1) // 2 - q
                    t = tl[q]
                    for ll in range(w - 1 - q):
                        l = w - 1 - ll
                        t = t - sh[base + l] * zl[lq + l]
                    rii = sh[base + q]
                    s = cast(at(S, i, j))
                    o = cast(at(O, i, j))
                    t = t - rii * o
                    d = rii * s
                    if sampled:
                        xi = klein_pick(t / d, d, at(LO, i, j), at(HI, i, j), tau[j],
                                        sqrt_tau[j], seeds[j], smp, i, nlev, lbuf, ubuf)
                    else:
                        xi = box_round(t / d, at(LO, i, j), at(HI, i, j))
                    X[i, c] = np.int64(xi)
                    z = s * xi + o
                    Z[i, c] = z
                    zl[lq + q] = z
                    e = t - d * xi
                    cl += e * e
        if active:
            cost[c] += cl

    _KERNELS[key] = kern
    return kern


def block_levels(block_size, dtype=None):
    """Levels per block (launch and product): ``block_size`` capped by the launch size."""
    return max(1, min(int(block_size), LAUNCH.levels, MAX_LEVELS))


def sub_levels(dtype):
    """Levels per shared-memory sub-block for working ``dtype``."""
    return max(1, min(LAUNCH.sub_levels, SHARED_LEVELS[np.dtype(dtype)]))


def sweep(can, levels, dtype, *, k_rhs=None, sampled=None):
    """One blocked nearest-plane sweep on the device; returns ``(X, Z, cost)``.

    ``can`` a :class:`~bils._validate.Canonical` (numpy or device arrays), ``levels`` per
    block, ``dtype`` the working precision. With ``sampled = (s0, n_samples, tau, seeds)``
    (Klein) the sweep runs on ``n_samples * k`` columns, column ``s * k + j`` drawing
    RHS ``j``'s sample ``s0 + s``.
    """
    xp = xp_module()
    dtype = np.dtype(dtype)
    Y = to_device(can.Y, np.float64)
    n, k = Y.shape
    R = to_device(can.R, dtype)
    S, O, LO, HI = grids(can)
    if sampled is None:
        kc = k
        tau = sqt = xp.zeros(1)
        seeds = xp.zeros(1, dtype=np.uint64)
        s0 = 0
    else:
        s0, ns, tau_h, seeds_h = sampled
        kc = ns * k
        tau = to_device(tau_h, np.float64)
        sqt = xp.sqrt(tau)
        seeds = to_device(seeds_h, np.uint64)
    kern = sweep_kernel(dtype, sampled is not None)
    sub = sub_levels(dtype)
    X = xp.empty((n, kc), dtype=np.int64)
    Z = xp.empty((n, kc), dtype=dtype)
    cost = xp.zeros(kc)
    for e in range(n, 0, -levels):
        a = max(0, e - levels)
        has_g = e < n
        G = xp.matmul(R[a:e, e:], Z[e:]) if has_g else Z[:1]
        launch(kern, kc, Y, G, has_g, R, a, e - a, sub, S, O, LO, HI, X, Z, cost, tau, sqt, seeds,
               k, s0, n)
    return X, Z, cost


def babai_kernel(can, *, block_size, precision="float64"):
    """CUDA kernel of :func:`bils.babai` (same contract as ``_babai_numpy``)."""
    xp = xp_module()
    dtype = np.dtype(precision)
    x, _, cost = sweep(can, block_levels(block_size, dtype), dtype)
    status = xp.full(can.k, int(Status.HEURISTIC), dtype=np.int8)
    return x, cost, status, {"block_size": block_size, "precision": precision}
