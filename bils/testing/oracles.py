r"""Slow, obviously correct reference solvers.

Each oracle has the solvers' signature ``oracle(R, Y, lo, hi, /, *, scale=None,
offset=None, ...)`` (or ``oracle(problem)`` with a :class:`bils.BILSProblem` or a
:class:`~bils.testing.ProblemCase`) and returns a :class:`bils.BILSResult`, so it can be
compared with — or checked like — any solver.

* :func:`brute_force` scores every point of the box (small boxes only); it also gives
  the ``n_best`` best points.
* :func:`babai_textbook` is the nearest-plane double loop in plain Python floats, written
  from the formula and nothing else.
* :func:`exact_solve` is the exact solver with a certificate: brute force where the box
  is small, :func:`bils.enumerate` otherwise, and both (cross-checked) where both apply.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from bils.result import BILSResult, Status

from ._case import ProblemCase, as_case

__all__ = ["brute_force", "babai_textbook", "exact_solve", "DEFAULT_MAX_POINTS"]

#: Largest box (points per RHS) that :func:`brute_force` scores by default.
DEFAULT_MAX_POINTS = 1 << 16

_CHUNK = 1 << 15


def _case_of(R, Y, lo, hi, scale, offset) -> ProblemCase:
    if Y is None and lo is None and hi is None and scale is None and offset is None:
        return as_case(R)
    if Y is None or lo is None or hi is None:
        raise TypeError("`R`, `Y`, `lo` and `hi` are required (or pass a problem)")
    return as_case((R, Y, lo, hi, scale, offset))


def _result(case, x, cost, status, solver, info):
    if case.squeeze:
        x, cost, status = x[:, 0], cost[0], status[0]
        if "best_x" in info:
            info = dict(info, best_x=info["best_x"][:, :, 0], best_cost=info["best_cost"][:, 0])
    return BILSResult(x=x, cost=np.asarray(cost), status=np.asarray(status), backend="numpy",
                      solver=solver, info=info)


def _box_points_column(lo, hi):
    """All integer points of the box ``[lo, hi]`` (n,), as (P, n) int64, lexicographic."""
    axes = [np.arange(a, b + 1, dtype=np.int64) for a, b in zip(lo, hi)]
    grid = np.meshgrid(*axes, indexing="ij")
    return np.stack([g.reshape(-1) for g in grid], axis=1)


def brute_force(R, Y=None, lo=None, hi=None, /, *, scale=None, offset=None, n_best=1,
                max_points=DEFAULT_MAX_POINTS):
    r"""Score every point of the box; exact by exhaustion.

    Parameters
    ----------
    R, Y, lo, hi, scale, offset
        As in :func:`bils.babai`, or one problem (``BILSProblem`` / ``ProblemCase``).
        ``R`` need not be triangular.
    n_best : int, default 1
        Also return the ``n_best`` best points (sorted by cost; equal costs keep the
        lexicographic order of the box) in ``info["best_x"]`` (m, n, k) and
        ``info["best_cost"]`` (m, k), ``inf``-padded when the box is smaller.
    max_points : int
        Refuse (``ValueError``) boxes with more points per RHS than this.

    Returns
    -------
    BILSResult
        ``status`` all ``OPTIMAL``; ``info["points"]`` (k,) points scored.

    Examples
    --------
    >>> import numpy as np
    >>> from bils.testing import brute_force
    >>> R = np.array([[2.0, 1.0], [0.0, 1.0]])
    >>> Y = np.array([[3.125, 0.25], [0.875, -1.375]])
    >>> res = brute_force(R, Y, -2, 2, n_best=3)
    >>> res.x.tolist(), res.cost.tolist(), res.info["points"].tolist()
    ([[1, 1], [1, -2]], [0.03125, 0.453125], [25, 25])
    >>> res.info["best_cost"].tolist()  # the three best costs of each RHS
    [[0.03125, 0.453125], [1.53125, 0.703125], [2.03125, 1.703125]]
    >>> brute_force(np.eye(20), np.zeros(20), -2, 2)
    Traceback (most recent call last):
        ...
    ValueError: the box has 95367431640625 points per RHS, more than `max_points` = 65536
    """
    case = _case_of(R, Y, lo, hi, scale, offset)
    n, k = case.n, case.k
    if int(n_best) < 1:
        raise ValueError("`n_best` must be >= 1")
    bp = case.box_points
    if np.max(bp) > max_points:
        raise ValueError(f"the box has {int(np.max(bp))} points per RHS, more than "
                         f"`max_points` = {max_points}")
    LO, HI, S, O = case.full("lo"), case.full("hi"), case.full("scale"), case.full("offset")
    best_x = np.zeros((n_best, n, k), dtype=np.int64)
    best_cost = np.full((n_best, k), np.inf)
    for j in range(k):
        pts = _box_points_column(LO[:, j], HI[:, j])
        costs = np.empty(len(pts))
        for a in range(0, len(pts), _CHUNK):
            P = pts[a:a + _CHUNK]
            Z = P * S[:, j] + O[:, j]  # (p, n)
            r = case.Y[:, j] - Z @ case.R.T
            costs[a:a + _CHUNK] = np.sum(r * r, axis=1)
        if case.cost_offset is not None:
            costs += case.cost_offset[j]
        order = np.argsort(costs, kind="stable")[:n_best]
        best_x[:len(order), :, j] = pts[order]
        best_cost[:len(order), j] = costs[order]
    x = best_x[0].copy()
    cost = best_cost[0].copy()
    status = np.full(k, Status.OPTIMAL, dtype=np.int8)
    info = {"points": bp.astype(np.int64)}
    if n_best > 1:
        info.update(best_x=best_x, best_cost=best_cost)
    return _result(case, x, cost, status, "brute_force", info)


def babai_textbook(R, Y=None, lo=None, hi=None, /, *, scale=None, offset=None):
    r"""Box Babai (nearest plane) as the textbook double loop, in Python floats.

    For each RHS, for ``i = n-1, ..., 0``:

    .. math::

        c_i = \frac{y_i - \sum_{l \ge i} R_{il} o_l - \sum_{l > i} R_{il} s_l x_l}{R_{ii} s_i},
        \qquad x_i = \min(\max(\lfloor c_i + \tfrac12 \rfloor, lo_i), hi_i)

    and the cost is the sum of the level residuals :math:`(R_{ii} s_i (c_i - x_i))^2`.
    No blocking, no vectorisation: the reference the fast paths are checked against.

    Parameters
    ----------
    R, Y, lo, hi, scale, offset
        As in :func:`bils.babai`, or one problem (``BILSProblem`` / ``ProblemCase``).
        ``R`` must be upper triangular with a non-zero diagonal.

    Returns
    -------
    BILSResult
        ``x`` (n, k) int64 (``(n,)`` for a 1-D ``Y``), ``cost``, ``status`` all
        ``HEURISTIC``.

    Raises
    ------
    ValueError
        If ``R`` is not upper triangular with a non-zero diagonal.

    Examples
    --------
    >>> import numpy as np, bils
    >>> from bils.testing import babai_textbook
    >>> R = np.array([[2.0, 1.0], [0.0, 1.0]])
    >>> Y = np.array([[3.125, 0.25], [0.875, -1.375]])
    >>> ref = babai_textbook(R, Y, -2, 2)
    >>> ref.x.tolist(), ref.cost.tolist()
    ([[1, 1], [1, -1]], [0.03125, 0.703125])
    >>> fast = bils.babai(R, Y, -2, 2, backend="numpy")
    >>> bool(np.array_equal(fast.x, ref.x))
    True
    """
    case = _case_of(R, Y, lo, hi, scale, offset)
    if not case.triangular:
        raise ValueError("`R` must be upper triangular with a non-zero diagonal")
    n, k = case.n, case.k
    Rm = case.R.tolist()
    LO, HI = case.full("lo").tolist(), case.full("hi").tolist()
    S, O = case.full("scale").tolist(), case.full("offset").tolist()
    Yl = case.Y.tolist()
    x = np.empty((n, k), dtype=np.int64)
    cost = np.zeros(k)
    for j in range(k):
        xj = [0] * n
        total = 0.0
        for i in range(n - 1, -1, -1):
            acc = Yl[i][j]
            for l in range(i, n):
                acc -= Rm[i][l] * O[l][j]
            for l in range(i + 1, n):
                acc -= Rm[i][l] * (S[l][j] * xj[l])
            d = Rm[i][i] * S[i][j]
            c = acc / d
            xi = min(max(math.floor(c + 0.5), LO[i][j]), HI[i][j])
            xj[i] = xi
            e = acc - d * xi
            total += e * e
        x[:, j] = xj
        cost[j] = total
    if case.cost_offset is not None:
        cost = cost + case.cost_offset
    status = np.full(k, Status.HEURISTIC, dtype=np.int8)
    return _result(case, x, cost, status, "babai_textbook", {})


def exact_solve(R, Y=None, lo=None, hi=None, /, *, scale=None, offset=None,
                max_points=DEFAULT_MAX_POINTS, cross_check=True, rtol=1e-9):
    r"""The exact minimiser with a certificate of how optimality was established.

    Brute force when the box has at most ``max_points`` points per RHS, else
    :func:`bils.enumerate` with no node budget (whose every RHS must report
    ``OPTIMAL``). With ``cross_check`` and a small box, both run and must agree on the
    optimal cost (within ``rtol``), or an ``AssertionError`` says which RHS disagrees.

    Parameters
    ----------
    R, Y, lo, hi, scale, offset
        As in :func:`bils.babai`, or one problem (``BILSProblem`` / ``ProblemCase``).
        ``R`` need not be triangular when the box is small enough for brute force.
    max_points : int, default 65536
        Largest box (points per RHS) scored by brute force
        (:data:`DEFAULT_MAX_POINTS`); larger boxes go to :func:`bils.enumerate`.
    cross_check : bool, default True
        On a small box, also run :func:`bils.enumerate` (when ``R`` is triangular) and
        require the same optimal cost.
    rtol : float, default 1e-9
        Relative tolerance of that comparison.

    Returns
    -------
    BILSResult
        ``solver="exact"``, status ``OPTIMAL``, and ``info["certificate"]``: a dict with
        ``method`` (``"brute_force"``, ``"enumerate"`` or ``"brute_force+enumerate"``),
        ``points`` (box points scored, per RHS, brute force only), ``runner_up_cost``
        (the second-best cost, brute force only: the optimality gap) and ``nodes``
        (search nodes, enumerate only).

    Raises
    ------
    AssertionError
        If brute force and :func:`bils.enumerate` disagree, or the search without a node
        budget does not report ``OPTIMAL``.
    RuntimeError
        If the box is too large for brute force and :func:`bils.enumerate` cannot be used.

    Examples
    --------
    >>> import numpy as np
    >>> from bils.testing import exact_solve
    >>> R = np.array([[2.0, 1.0], [0.0, 1.0]])
    >>> Y = np.array([[3.125, 0.25], [0.875, -1.375]])
    >>> res = exact_solve(R, Y, -2, 2)
    >>> res.solver, res.x.tolist(), res.cost.tolist(), res.all_optimal
    ('exact', [[1, 1], [1, -2]], [0.03125, 0.453125], True)
    >>> cert = res.info["certificate"]
    >>> cert["method"], cert["runner_up_cost"].tolist(), cert["nodes"].tolist()
    ('brute_force+enumerate', [1.53125, 0.703125], [4, 7])
    >>> exact_solve(R, Y, -2, 2, max_points=10).info["certificate"]["method"]
    'enumerate'
    """
    case = _case_of(R, Y, lo, hi, scale, offset)
    small = bool(np.max(case.box_points) <= max_points)
    cert = {}
    if small:
        bf = brute_force(case, n_best=2, max_points=max_points)
        x = np.asarray(bf.x).reshape(case.n, case.k)
        cost = np.asarray(bf.cost).reshape(case.k)
        cert.update(method="brute_force", points=np.asarray(bf.info["points"]),
                    runner_up_cost=np.asarray(bf.info["best_cost"]).reshape(2, case.k)[1])
    if not small or cross_check:
        en = _enumerate(case)
        if en is None and not small:
            raise RuntimeError("the box is too large for brute force and bils.enumerate "
                               "is not available")
        if en is not None:
            ex, ec, nodes = en
            cert["nodes"] = nodes
            if small:
                tol = case.cost_tolerance(x, rtol)
                bad = np.flatnonzero(np.abs(ec - cost) > tol)
                if bad.size:
                    j = int(bad[0])
                    raise AssertionError(
                        f"exact oracles disagree on RHS {j}: brute force cost {cost[j]!r} at "
                        f"x={x[:, j].tolist()}, bils.enumerate cost {ec[j]!r} at "
                        f"x={ex[:, j].tolist()}\n{case.column(j)!r}")
                cert["method"] = "brute_force+enumerate"
            else:
                x, cost = ex, ec
                cert["method"] = "enumerate"
    status = np.full(case.k, Status.OPTIMAL, dtype=np.int8)
    return _result(case, x, cost, status, "exact", {"certificate": cert})


def _enumerate(case):
    """bils.enumerate on ``case`` (numpy backend): (x, cost, nodes), or None if unusable."""
    if not case.triangular:
        return None
    try:
        from bils import enumerate as bils_enumerate
    except ImportError:  # pragma: no cover - the solver is part of bils
        return None
    plain = replace(case, cost_offset=None)
    res = plain.solve(bils_enumerate, backend="numpy")
    status = np.asarray(res.status).reshape(-1)
    if np.any(status != Status.OPTIMAL):
        raise AssertionError("bils.enumerate without a node budget did not report OPTIMAL")
    cost = np.asarray(res.cost, dtype=np.float64).reshape(case.k)
    if case.cost_offset is not None:
        cost = cost + case.cost_offset
    return (np.asarray(res.x).reshape(case.n, case.k), cost, np.asarray(res.info["nodes"]))
