r"""CUDA Klein: the Babai sweep, then all sampled sweeps at once, best kept per RHS.

Sample ``s`` of RHS ``j`` is column ``s k + j`` of one blocked sweep over ``n_samples * k``
columns (:func:`bils._cuda.babai.sweep` with the decision replaced by
:func:`klein_pick`): per block one product for all samples and one kernel drawing every
level of every (sample, RHS) pair. The uniforms are the counter-based streams of
:mod:`bils._rng` (one seed per RHS, then a pure function of (seed, sample, level)), so a
seeded run draws the CPU's samples. The winner per RHS is the first of (Babai, sample 0,
sample 1, ...) with the least cost, which is what the CPU's sequential strict-improvement
loop keeps. Samples are drawn in groups of at most :data:`SAMPLE_BYTES` of device memory.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from ..result import Status
from ._common import box_round, uniform, xp_module
from .babai import block_levels, sweep

__all__ = ["klein_kernel", "klein_pick", "NBUF"]

#: Klein's window half-width in standard deviations (``bils.klein.WINDOW_SIGMAS``).
WINDOW_SIGMAS = 6.0
#: Weights below ``exp(-_SKIP_EXP)`` are not evaluated (``bils._numba.klein``).
_SKIP_EXP = 45.0
#: Candidates per side of the centre whose weights are kept in local memory.
NBUF = 32
#: Device bytes of sample codes and points per sampled sweep (int64 + float64 per level,
#: RHS and sample): more samples are drawn in several sweeps.
SAMPLE_BYTES = 4 << 30


@cuda.jit(device=True, inline=True)
def _window(d, sqrt_tau, flo, fhi):
    w = math.ceil(WINDOW_SIGMAS * sqrt_tau / abs(d)) + 1.0
    if fhi - flo < w:
        w = fhi - flo
    return w


@cuda.jit(device=True, inline=True)
def _wt(buf, q, z, d, c, emin, tau):
    if q < NBUF:
        return buf[q]
    r = d * (c - z)
    return math.exp(-((r * r - emin) / tau))


@cuda.jit(device=True, inline=True)
def klein_pick(c, d, lo, hi, tau, sqrt_tau, seed, sample, level, n, lbuf, ubuf):
    """Klein's draw at one level: :func:`bils._numba.klein.klein_pick` on the device."""
    m = box_round(c, lo, hi)
    if not tau > 0.0:
        return m
    flo = np.float64(lo)
    fhi = np.float64(hi)
    r = d * (c - m)
    emin = r * r
    w = -1.0
    nl = 0
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
        if nl < NBUF:
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
        if nu < NBUF:
            ubuf[nu] = math.exp(-arg)
        nu += 1
    if nl == 0 and nu == 0:
        return m
    total = 0.0
    for qq in range(nl):
        q = nl - 1 - qq
        total += _wt(lbuf, q, m - (q + 1), d, c, emin, tau)
    total += 1.0
    for q in range(nu):
        total += _wt(ubuf, q, m + (q + 1), d, c, emin, tau)
    u = uniform(seed, sample, level, n) * total
    cum = 0.0
    for qq in range(nl):
        q = nl - 1 - qq
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


def klein_kernel(can, *, n_samples, tau, seeds, block_size):
    """CUDA kernel of :func:`bils.klein` (same contract as ``_klein_numpy``)."""
    xp = xp_module()
    n, k = can.Y.shape
    levels = block_levels(block_size, np.float64)
    xb, _, cost_b = sweep(can, levels, np.float64)
    x, cost = xb, cost_b
    improved = xp.zeros(k, dtype=bool)
    if n_samples > 0:
        # samples in groups of at most SAMPLE_BYTES of (codes + points) per sweep
        group = max(1, min(n_samples, SAMPLE_BYTES // max(1, 16 * n * k)))
        cols = xp.arange(k)
        best = xp.zeros(k, dtype=np.int64)  # 0: Babai, s + 1: sample s
        for s0 in range(0, n_samples, group):
            g = min(group, n_samples - s0)
            with np.errstate(over="ignore"):  # uint64 hashing wraps (simulator)
                xs, _, cs = sweep(can, levels, np.float64, sampled=(s0, g, tau, seeds))
            cs = cs.reshape(g, k)
            first = xp.argmin(cs, axis=0)  # first least sample of the group
            cmin = cs[first, cols]
            better = cmin < cost  # strict: earlier samples (and Babai) win ties
            cost = xp.where(better, cmin, cost)
            best = xp.where(better, s0 + first + 1, best)
            x = xp.where(better[None, :], xs[:, first * k + cols], x)
        improved = best > 0
    status = xp.full(k, int(Status.HEURISTIC), dtype=np.int8)
    return x, cost, status, {"n_samples": n_samples, "tau": tau, "improved": improved,
                             "block_size": block_size}
