"""Numba Klein: the Babai sweep plus ``n_samples`` sampled sweeps, best kept per RHS.

Every sampled sweep is the blocked nearest-plane sweep of :mod:`bils._numba.babai` with
the per-level decision replaced by Klein's discrete-Gaussian draw. The uniforms come from
the counter-based generator of :mod:`bils._rng` (seed per RHS drawn from ``rng`` before
the kernel, then a pure function of (seed, sample, level)), so samples are identical on
every backend and thread count.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..result import Status
from ._common import TILE, readonly
from .babai import sweep

__all__ = ["klein_kernel"]


@njit(cache=True, parallel=True)
def _keep_better(xbest, cbest, xs, cs, improved, width):
    """Where ``cs < cbest`` (strictly), take the sample's column and cost."""
    n, k = xbest.shape
    for t in prange((k + width - 1) // width):
        j0 = t * width
        j1 = min(k, j0 + width)
        better = np.zeros(j1 - j0, dtype=np.bool_)
        for j in range(j0, j1):
            if cs[j] < cbest[j]:
                cbest[j] = cs[j]
                improved[j] = True
                better[j - j0] = True
        for i in range(n):
            for j in range(j0, j1):
                if better[j - j0]:
                    xbest[i, j] = xs[i, j]


def klein_kernel(can, *, n_samples, tau, seeds, block_size):
    """Numba kernel of :func:`bils.klein` (same contract as ``_klein_numpy``)."""
    n, k = can.Y.shape
    x = np.empty((n, k), dtype=np.int64)
    z = np.empty((n, k))
    cost = np.empty(k)
    sweep(can, block_size, x, z, cost)
    improved = np.zeros(k, dtype=bool)
    if n_samples > 0:
        tau = np.ascontiguousarray(tau, dtype=np.float64)
        sqrt_tau = readonly(np.sqrt(tau))
        tau = readonly(tau)
        seeds = readonly(np.ascontiguousarray(seeds, dtype=np.uint64))
        xs = np.empty_like(x)
        cs = np.empty(k)
        for s in range(n_samples):
            sweep(can, block_size, xs, z, cs, sample=s, tau=tau, sqrt_tau=sqrt_tau, seeds=seeds)
            _keep_better(x, cost, xs, cs, improved, TILE)
    status = np.full(k, Status.HEURISTIC, dtype=np.int8)
    return x, cost, status, {"n_samples": n_samples, "tau": tau, "improved": improved,
                             "block_size": block_size}
