r"""Exact search: Schnorr–Euchner depth-first enumeration with a box."""

from __future__ import annotations

import builtins
import math

import numpy as np

from ._driver import run_solver
from ._guard import estimated, scratch_iv
from ._validate import int_iv
from .result import Status

__all__ = ["enumerate"]


def _se_single(R, y, s, lo, hi, max_nodes, n_best):
    """Schnorr–Euchner search for one RHS in the scaled basis ``R diag(s)``.

    ``y`` already has the offset removed. Returns (best list [(cost, x)], nodes, finished).
    Iterative, box-aware: at each level the children are visited in increasing distance
    to the centre (the box-Babai value first), the radius shrinks to the m-th best leaf.
    """
    n = R.shape[0]
    d = [R[i, i] * s[i] for i in range(n)]
    x = [0] * n
    c = [0.0] * n
    nxt_lo = [0] * n  # next unvisited candidate below the centre
    nxt_hi = [0] * n  # next unvisited candidate above
    partial = [0.0] * (n + 1)  # partial[i]: cost of levels > i  (partial[n] = 0)
    best = []  # sorted list of (cost, tuple x)
    beta = math.inf
    nodes = 0

    def centre(i):
        t = y[i]
        for j in range(i + 1, n):
            t -= R[i, j] * s[j] * x[j]
        return t / d[i]

    def first(i):
        ci = c[i]
        m = min(max(math.floor(ci + 0.5), lo[i]), hi[i])
        x[i] = m
        nxt_lo[i] = m - 1
        nxt_hi[i] = m + 1

    def advance(i):
        """Move level i to its next candidate by distance; False when the box is exhausted."""
        ci = c[i]
        a, b = nxt_lo[i], nxt_hi[i]
        a_ok, b_ok = a >= lo[i], b <= hi[i]
        if not a_ok and not b_ok:
            return False
        if a_ok and (not b_ok or ci - a <= b - ci):
            x[i] = a
            nxt_lo[i] = a - 1
        else:
            x[i] = b
            nxt_hi[i] = b + 1
        return True

    i = n - 1
    c[i] = centre(i)
    first(i)
    budget_hit = False
    while True:
        e = y_level = d[i] * (c[i] - x[i])
        newdist = partial[i + 1] + e * y_level
        nodes += 1
        if newdist < beta:
            if i > 0:
                partial[i] = newdist
                i -= 1
                c[i] = centre(i)
                first(i)
                continue
            # leaf
            best.append((newdist, tuple(x)))
            best.sort(key=lambda t: t[0])
            del best[n_best:]
            if len(best) == n_best:
                beta = best[-1][0]
            if max_nodes >= 0 and nodes >= max_nodes:
                budget_hit = True
                break
            if not advance(0):
                i = _climb(1, n, advance)
                if i < 0:
                    break
            continue
        if max_nodes >= 0 and nodes >= max_nodes and best:
            budget_hit = True
            break
        # siblings at this level are no better: go up and advance the parent
        i = _climb(i + 1, n, advance)
        if i < 0:
            break
    return best, nodes, not budget_hit


def _climb(i, n, advance):
    """Advance the first level >= i that still has candidates; -1 when the search is done."""
    while i < n:
        if advance(i):
            return i
        i += 1
    return -1


def _enumerate_numpy(can, *, max_nodes, n_best):
    n, k = can.Y.shape
    Yo = can.Y - can.offset.premultiply(can.R)
    x = np.empty((n, k), dtype=np.int64)
    cost = np.empty(k)
    status = np.empty(k, dtype=np.int8)
    nodes = np.empty(k, dtype=np.int64)
    best_x = np.zeros((n_best, n, k), dtype=np.int64)
    best_cost = np.full((n_best, k), np.inf)
    for j in range(k):
        s = np.asarray(can.scale.col(j), dtype=np.float64)
        lo = [int(v) for v in can.lo[:, j]]
        hi = [int(v) for v in can.hi[:, j]]
        best, nodes[j], finished = _se_single(can.R, Yo[:, j], s, lo, hi, max_nodes, n_best)
        x[:, j] = best[0][1]
        cost[j] = best[0][0]
        status[j] = Status.OPTIMAL if finished else Status.BUDGET_EXHAUSTED
        for r, (cst, xs) in builtins.enumerate(best):
            best_x[r, :, j] = xs
            best_cost[r, j] = cst
    info = {"nodes": nodes, "max_nodes": max_nodes}
    if n_best > 1:
        info.update(best_x=best_x, best_cost=best_cost)
    return x, cost, status, info


def _enumerate_numba():
    from ._numba.enumerate import enumerate_kernel

    return enumerate_kernel


def _enumerate_cupy():
    from ._cuda.enumerate import enumerate_kernel

    return enumerate_kernel


KERNELS = {"numpy": lambda: _enumerate_numpy, "numba": _enumerate_numba, "cupy": _enumerate_cupy}


def enumerate(R, Y=None, lo=None, hi=None, /, *, scale=None, offset=None, max_nodes=None,
              n_best=1, backend="auto"):
    r"""Exact box-constrained search (Schnorr–Euchner with radius shrinking).

    Finds, for each RHS,

    .. math::

        \hat x = \arg\min_{x \in \mathbb{Z}^n,\; lo \le x \le hi}
        \lVert y - R\,(s \circ x + o) \rVert_2^2

    by depth-first search of the nearest-plane tree. At each level the children are
    visited in increasing distance to the centre :math:`c_i`, skipping values outside
    the box; the first leaf is the box-Babai point; every leaf shrinks the search
    radius to its cost (to the ``n_best``-th best cost with ``n_best > 1``); a level is
    left as soon as its next child cannot beat the radius.

    Parameters
    ----------
    R, Y, lo, hi, scale, offset
        As in :func:`bils.babai` (or a :class:`~bils.BILSProblem` first).
    max_nodes : int, optional
        Node budget per RHS (nodes = partial points scored). When reached, the best
        point found so far is returned with status ``BUDGET_EXHAUSTED``; the Babai
        leaf is always reached first. ``None``: unlimited.
    n_best : int, default 1
        Also return the ``n_best`` best distinct points, sorted by cost, in
        ``info["best_x"]`` (m, n, k) and ``info["best_cost"]`` (m, k) (``inf``-padded
        when the box holds fewer points).
    backend : {"auto", "numpy", "numba", "cupy"}

    Returns
    -------
    BILSResult
        ``status`` is ``OPTIMAL`` for every RHS whose search finished;
        ``info["nodes"]`` (k,) counts nodes visited.

    Notes
    -----
    Worst case exponential in ``n``; fast when :math:`R` is well conditioned and the
    targets are near the lattice. Use :func:`bils.kbest` or :func:`bils.klein` beyond
    a few dozen dimensions, or set ``max_nodes``. Ties keep the first leaf found.

    Right-hand sides are searched in chunks from a Python loop, and the numba backend
    runs each search in slices of nodes, so Ctrl-C (``KeyboardInterrupt``) stops even a
    single long search within a fraction of a second; results do not depend on the
    slicing. An ``n_best`` list that would not fit in memory is refused up front
    (``ValueError`` with the estimate); ``max_nodes >= 2**62`` means no budget.

    References
    ----------
    .. [1] C. P. Schnorr, M. Euchner, "Lattice basis reduction: improved practical
       algorithms and solving subset sum problems", Math. Programming 66 (1994).
    .. [2] X.-W. Chang, Q. Han, "Solving box-constrained integer least squares
       problems", IEEE Trans. Wireless Commun. 7 (2008).

    Examples
    --------
    >>> import numpy as np, bils
    >>> R = np.array([[1.0, 0.9], [0.0, 0.2]])
    >>> y = np.array([0.3, 0.11])
    >>> bils.enumerate(R, y, 0, 3, backend="numpy").x.tolist()
    [0, 0]
    >>> bils.babai(R, y, 0, 3, backend="numpy").x.tolist()   # not optimal
    [0, 1]
    """
    max_nodes = int_iv("max_nodes", max_nodes, minimum=1, allow_none=True)
    if max_nodes is not None and max_nodes >= _UNLIMITED_NODES:
        max_nodes = None  # beyond any reachable count (and beyond int64 in the kernels)
    n_best = int_iv("n_best", n_best, minimum=1)
    # no RHS chunking here: the numpy reference is a Python loop and the numba kernel runs
    # its searches in node slices from Python, so both honour Ctrl-C already
    kernels = {be: (lambda f=f: estimated(f(), _enumerate_ops)) for be, f in KERNELS.items()}
    return run_solver("enumerate", kernels, R, Y, lo, hi, scale, offset, backend,
                      {"max_nodes": -1 if max_nodes is None else max_nodes, "n_best": n_best})


#: ``max_nodes`` at or above this count means no budget.
_UNLIMITED_NODES = 2**62
#: Operations per RHS assumed for an unbudgeted search when sizing RHS chunks.
_UNBUDGETED_OPS = 1e6


def _enumerate_ops(can, *, max_nodes, n_best):
    """Operations per RHS (an estimate); refuses an ``n_best`` list that cannot fit.

    The m-best lists take ``8 m (n + 1) k`` bytes (and again per RHS as scratch). The
    work of an exact search is unknown up front: ``max_nodes * n`` with a budget, else a
    nominal :data:`_UNBUDGETED_OPS`.
    """
    n, k = can.Y.shape
    scratch_iv(f"`enumerate` with `n_best`={n_best}, n={n} and k={k}",
               8 * n_best * (n + 1) * (k + 1) * 2, "lower `n_best`")
    return float(max_nodes) * n if max_nodes > 0 else _UNBUDGETED_OPS
