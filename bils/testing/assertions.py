r"""Assertions on BILS solver outputs, in the style of :mod:`numpy.testing`.

Every helper takes the problem as a :class:`~bils.testing.ProblemCase`, a
:class:`bils.BILSProblem` or a tuple ``(R, Y, lo, hi[, scale[, offset]])``, and a
solver's output as a :class:`bils.BILSResult` (anything with ``.x`` and ``.cost``) or a
bare integer array ``x``. On failure they raise ``AssertionError`` with a message that
shows the smallest failing right-hand side as a self-contained 1-RHS problem (Python
source that rebuilds it), the returned point and its cost, and the optimum (brute force
where the box is small enough).

Helpers that call the solver (:func:`assert_multi_rhs_consistent`,
:func:`assert_translation_equivariant`) take it as a callable with the library's
signature ``solver(R, Y, lo, hi, /, *, scale=None, offset=None)``; bind options with
:func:`functools.partial`.
"""

from __future__ import annotations

import numpy as np

from bils.result import Status

from ._case import ProblemCase, as_case, unpack_result
from .oracles import DEFAULT_MAX_POINTS, exact_solve

__all__ = [
    "assert_feasible",
    "assert_cost_consistent",
    "assert_optimal",
    "assert_never_worse_than",
    "assert_multi_rhs_consistent",
    "assert_translation_equivariant",
    "assert_recovers",
    "assert_same_solution",
]

#: Default relative tolerance on costs (relative to ``||y||² + ||R z||²`` per RHS).
RTOL = 1e-9

_COMPARE = ("x", "cost")


# --------------------------------------------------------------------------- messages
def _optimum_text(sub: ProblemCase) -> str:
    """``optimum x = [...] cost = ...`` for a 1-RHS problem, or why it is not shown."""
    try:
        if sub.box_points[0] <= DEFAULT_MAX_POINTS:
            ex = exact_solve(sub, cross_check=False)
            how = f"brute force over {int(sub.box_points[0])} box points"
        elif sub.triangular:
            from bils import enumerate as bils_enumerate

            ex = sub.solve(bils_enumerate, backend="numpy", max_nodes=10**6)
            if np.asarray(ex.status).reshape(-1)[0] != Status.OPTIMAL:
                return "optimum  : not computed (bils.enumerate ran out of its node budget)"
            how = "bils.enumerate"
        else:
            return "optimum  : not computed (box too large for brute force)"
    except Exception as exc:  # noqa: BLE001 - the message must still be produced
        return f"optimum  : not computed ({type(exc).__name__}: {exc})"
    xo = np.asarray(ex.x).reshape(-1)
    co = float(np.asarray(ex.cost).reshape(-1)[0])
    return f"optimum  x = {xo.tolist()}  cost = {co!r}  ({how})"


def _indent(text, pad="    "):
    return pad + text.replace("\n", "\n" + pad)


def _smallest(case: ProblemCase, bad) -> int:
    """The failing RHS with the smallest box (then the lowest index)."""
    bad = np.asarray(bad, dtype=np.int64)
    bp = case.box_points[bad]
    return int(bad[np.lexsort((bad, bp))[0]])


def _fail(title, case, bad, details, *, x=None, cost=None, extra=""):
    """Raise the standard AssertionError for the failing RHS ``bad``."""
    j = _smallest(case, bad)
    sub = case.column(j)
    lines = [f"{title}: {len(bad)} of {case.k} right-hand side(s) fail; "
             f"smallest counterexample is RHS {j}" + (f" ({case.label})" if case.label else "")]
    if details.get(j):
        lines.append(details[j])
    lines.append(f"counterexample (RHS {j} as a 1-RHS problem):")
    lines.append(_indent(sub.source()))
    if extra:
        lines.append(extra if isinstance(extra, str) else extra(j))
    if x is not None:
        xj = x[:, j]
        rec = float(sub.cost(xj)[0])
        rep = "" if cost is None else f"reported {float(cost[j])!r}, "
        lines.append(f"returned x = {xj.tolist()}  cost = {rep}recomputed {rec!r}")
    lines.append(_optimum_text(sub))
    raise AssertionError("\n".join(lines))


def _check_compare(compare):
    if compare not in _COMPARE:
        raise ValueError(f"`compare` must be one of {_COMPARE}, got {compare!r}")


# --------------------------------------------------------------------------- result checks
def assert_feasible(result, problem):
    """``x`` is an integer array of the right shape with ``lo <= x <= hi`` elementwise.

    Also checks, when present, that ``status`` holds one valid :class:`bils.Status`
    code per RHS and that ``cost`` has one finite value per RHS.

    Parameters
    ----------
    result : BILSResult or array_like of int
        The solver's output: anything with ``.x`` (and optionally ``.cost``,
        ``.status``), or a bare ``x``; ``x`` (n, k), or (n,) for a 1-D ``Y``.
    problem : ProblemCase, BILSProblem or tuple
        The problem ``result`` solves: see :func:`~bils.testing.as_case`.

    Raises
    ------
    AssertionError
        On a wrong shape or dtype, a point outside the box (showing the smallest
        failing RHS), a non-finite cost or an invalid status.

    Examples
    --------
    >>> import numpy as np, bils
    >>> from bils.testing import assert_feasible
    >>> R = np.array([[2.0, 1.0], [0.0, 1.0]])
    >>> problem = (R, np.array([[3.125, 0.25], [0.875, -1.375]]), -2, 2)  # (R, Y, lo, hi)
    >>> assert_feasible(bils.babai(*problem, backend="numpy"), problem)
    >>> assert_feasible(np.array([[1, 3], [1, -2]]), problem)
    Traceback (most recent call last):
        ...
    AssertionError: assert_feasible: 1 of 2 right-hand side(s) fail; smallest counterexample is RHS 1
    x[0] = 3 is outside the box [-2, 2]
    ...
    """
    case = as_case(problem)
    x, cost, status = unpack_result(result, case)
    if x.dtype.kind not in "iu":
        raise AssertionError(f"`x` must have an integer dtype, got {x.dtype}")
    lo, hi = case.full("lo"), case.full("hi")
    out = (x < lo) | (x > hi)
    bad = np.flatnonzero(out.any(axis=0))
    if bad.size:
        details = {}
        for j in bad:
            i = int(np.flatnonzero(out[:, j])[0])
            details[int(j)] = (f"x[{i}] = {int(x[i, j])} is outside the box "
                               f"[{int(lo[i, j])}, {int(hi[i, j])}]")
        _fail("assert_feasible", case, bad, details, x=x, cost=cost)
    if cost is not None and not np.all(np.isfinite(cost)):
        bad = np.flatnonzero(~np.isfinite(cost))
        _fail("assert_feasible", case, bad, {int(j): "reported cost is not finite" for j in bad},
              x=x, cost=cost)
    if status is not None:
        valid = np.isin(status, [int(s) for s in Status])
        if status.shape != (case.k,) or not np.all(valid):
            raise AssertionError(f"`status` must hold one bils.Status code per RHS, got {status!r}")


def assert_cost_consistent(result, problem, *, rtol=RTOL):
    """The reported cost equals ``||y_j - R (s_j∘x_j + o_j)||²`` recomputed from ``x``.

    Parameters
    ----------
    result : BILSResult
        The solver's output: anything with ``.x`` (n, k) and ``.cost`` (k,) (``(n,)``
        and a scalar for a 1-D ``Y``).
    problem : ProblemCase, BILSProblem or tuple
        The problem ``result`` solves: see :func:`~bils.testing.as_case`.
    rtol : float, default 1e-9
        Relative tolerance, relative to ``||y_j||² + ||R z_j||²`` per RHS.

    Raises
    ------
    AssertionError
        If the result reports no cost, or a reported cost differs from the recomputed
        one (showing the smallest failing RHS).

    Examples
    --------
    >>> import numpy as np, bils
    >>> from bils.testing import assert_cost_consistent
    >>> R = np.array([[2.0, 1.0], [0.0, 1.0]])
    >>> problem = (R, np.array([[3.125, 0.25], [0.875, -1.375]]), -2, 2)  # (R, Y, lo, hi)
    >>> res = bils.babai(*problem, backend="numpy")
    >>> assert_cost_consistent(res, problem)
    >>> wrong = bils.BILSResult(res.x, res.cost + [0.0, 1.0], res.status, "numpy", "mine")
    >>> assert_cost_consistent(wrong, problem)
    Traceback (most recent call last):
        ...
    AssertionError: assert_cost_consistent: 1 of 2 right-hand side(s) fail; smallest counterexample is RHS 1
    reported cost 1.703125 != recomputed 0.703125 (tolerance ...)
    ...
    """
    case = as_case(problem)
    x, cost, _ = unpack_result(result, case)
    if cost is None:
        raise AssertionError("the result reports no `cost`")
    rec = case.cost(x)
    tol = case.cost_tolerance(x, rtol)
    bad = np.flatnonzero(~(np.abs(cost - rec) <= tol))
    if bad.size:
        details = {int(j): f"reported cost {float(cost[j])!r} != recomputed {float(rec[j])!r} "
                           f"(tolerance {float(tol[j]):.3g})" for j in bad}
        _fail("assert_cost_consistent", case, bad, details, x=x, cost=cost)


def assert_optimal(result, problem, *, rtol=RTOL, max_points=DEFAULT_MAX_POINTS):
    """The cost of ``x`` equals the optimum from :func:`~bils.testing.oracles.exact_solve`.

    Costs are compared (recomputed from ``x``), not points: ties between distinct
    optimal points are allowed.

    Parameters
    ----------
    result : BILSResult or array_like of int
        The solver's output: anything with ``.x`` (and optionally ``.cost``), or a bare
        ``x``; ``x`` (n, k), or (n,) for a 1-D ``Y``.
    problem : ProblemCase, BILSProblem or tuple
        The problem ``result`` solves: see :func:`~bils.testing.as_case`.
    rtol : float, default 1e-9
        Relative tolerance on costs, relative to ``||y_j||² + ||R z_j||²`` per RHS.
    max_points : int, default 65536
        Boxes up to this many points per RHS are solved by brute force, larger ones by
        :func:`bils.enumerate` (see :func:`~bils.testing.oracles.exact_solve`).

    Raises
    ------
    AssertionError
        If the cost of ``x`` exceeds the optimum for some RHS (showing the smallest
        failing RHS, the returned point and the optimum).

    Examples
    --------
    >>> import numpy as np, bils
    >>> from bils.testing import assert_optimal
    >>> R = np.array([[2.0, 1.0], [0.0, 1.0]])
    >>> problem = (R, np.array([[3.125, 0.25], [0.875, -1.375]]), -2, 2)  # (R, Y, lo, hi)
    >>> assert_optimal(bils.enumerate(*problem, backend="numpy"), problem)
    >>> assert_optimal(bils.babai(*problem, backend="numpy"), problem)
    Traceback (most recent call last):
        ...
    AssertionError: assert_optimal: 1 of 2 right-hand side(s) fail; smallest counterexample is RHS 1
    cost 0.703125 exceeds the optimum 0.453125
    counterexample (RHS 1 as a 1-RHS problem):
        R = np.array([[2., 1.],
                      [0., 1.]])
        Y = np.array([[ 0.25 ],
                      [-1.375]])
        lo = np.array(-2, dtype=np.int64)
        hi = np.array(2, dtype=np.int64)
    returned x = [1, -1]  cost = reported 0.703125, recomputed 0.703125
    optimum  x = [1, -2]  cost = 0.453125  (brute force over 25 box points)
    """
    case = as_case(problem)
    x, cost, _ = unpack_result(result, case)
    ex = exact_solve(case, max_points=max_points, cross_check=False)
    best = np.asarray(ex.cost, dtype=np.float64).reshape(case.k)
    rec = case.cost(x)
    tol = case.cost_tolerance(x, rtol)
    bad = np.flatnonzero(rec > best + tol)
    if bad.size:
        details = {int(j): f"cost {float(rec[j])!r} exceeds the optimum {float(best[j])!r}"
                   for j in bad}
        _fail("assert_optimal", case, bad, details, x=x, cost=cost)


def assert_never_worse_than(result, baseline, problem, *, rtol=RTOL):
    """The cost of ``x`` is at most the baseline's cost, per RHS.

    ``baseline`` is another solver's output (``BILSResult`` or ``x``), a (k,) array of
    costs, or a callable solver run on the same problem (e.g.
    :func:`~bils.testing.oracles.babai_textbook`).

    Parameters
    ----------
    result : BILSResult or array_like of int
        The solver's output: anything with ``.x`` (and optionally ``.cost``), or a bare
        ``x``; ``x`` (n, k), or (n,) for a 1-D ``Y``.
    baseline : BILSResult, array_like of int, (k,) ndarray of float or callable
        What ``result`` must not be worse than (see above).
    problem : ProblemCase, BILSProblem or tuple
        The problem ``result`` solves: see :func:`~bils.testing.as_case`.
    rtol : float, default 1e-9
        Relative tolerance on costs, relative to ``||y_j||² + ||R z_j||²`` per RHS.

    Raises
    ------
    AssertionError
        If the cost of ``x`` exceeds the baseline's for some RHS (showing the smallest
        failing RHS).

    Examples
    --------
    >>> import numpy as np, bils
    >>> from bils.testing import assert_never_worse_than
    >>> R = np.array([[2.0, 1.0], [0.0, 1.0]])
    >>> problem = (R, np.array([[3.125, 0.25], [0.875, -1.375]]), -2, 2)  # (R, Y, lo, hi)
    >>> from bils.testing import babai_textbook
    >>> kb = bils.kbest(*problem, beam_width=4, backend="numpy")
    >>> assert_never_worse_than(kb, babai_textbook, problem)
    >>> assert_never_worse_than(babai_textbook(*problem), kb, problem)
    Traceback (most recent call last):
        ...
    AssertionError: assert_never_worse_than: 1 of 2 right-hand side(s) fail; smallest counterexample is RHS 1
    cost 0.703125 is worse than baseline's 0.453125 at x = [1, -2]
    ...
    """
    case = as_case(problem)
    x, cost, _ = unpack_result(result, case)
    if callable(baseline):
        name = getattr(baseline, "__name__", repr(baseline))
        baseline = baseline(case) if not case.triangular else case.solve(baseline)
    else:
        name = "baseline"
    if isinstance(baseline, np.ndarray) and baseline.dtype.kind == "f":
        bcost = baseline.reshape(case.k)
        bx = None
    else:
        bx, _, _ = unpack_result(baseline, case)
        bcost = case.cost(bx)
    rec = case.cost(x)
    tol = case.cost_tolerance(x, rtol)
    bad = np.flatnonzero(rec > bcost + tol)
    if bad.size:
        details = {}
        for j in bad:
            where = "" if bx is None else f" at x = {bx[:, j].tolist()}"
            details[int(j)] = (f"cost {float(rec[j])!r} is worse than {name}'s "
                               f"{float(bcost[j])!r}{where}")
        _fail("assert_never_worse_than", case, bad, details, x=x, cost=cost)


def assert_recovers(result, problem):
    """On a noiseless problem (``problem.x_true`` set) the solver returns ``x_true``.

    Parameters
    ----------
    result : BILSResult or array_like of int
        The solver's output: anything with ``.x`` (and optionally ``.cost``), or a bare
        ``x``; ``x`` (n, k), or (n,) for a 1-D ``Y``.
    problem : ProblemCase
        A problem with a planted point ``x_true`` (e.g. drawn by
        :func:`bils.testing.strategies.bils_problems` with ``targets=("noiseless",)``).

    Raises
    ------
    ValueError
        If `problem` has no ``x_true``.
    AssertionError
        If ``x`` differs from ``x_true`` for some RHS (showing the smallest failing RHS).

    Examples
    --------
    >>> import numpy as np, bils
    >>> from bils.testing import ProblemCase, assert_recovers
    >>> R = np.array([[2.0, 1.0], [0.0, 1.0]])
    >>> x_true = np.array([[1, 0], [-1, 2]])
    >>> case = ProblemCase(R, R @ x_true, lo=np.array(-2), hi=np.array(2), x_true=x_true)
    >>> assert_recovers(case.solve(bils.babai, backend="numpy"), case)
    >>> assert_recovers(np.zeros((2, 2), dtype=np.int64), case)
    Traceback (most recent call last):
        ...
    AssertionError: assert_recovers: 2 of 2 right-hand side(s) fail; smallest counterexample is RHS 0
    planted x_true = [1, -1] (cost 0.0) not recovered
    ...
    """
    case = as_case(problem)
    if case.x_true is None:
        raise ValueError("`problem` has no `x_true` (it is not a noiseless problem)")
    x, cost, _ = unpack_result(result, case)
    bad = np.flatnonzero(np.any(x != case.x_true, axis=0))
    if bad.size:
        details = {int(j): f"planted x_true = {case.x_true[:, j].tolist()} (cost "
                           f"{float(case.column(j).cost(case.x_true[:, j])[0])!r}) not recovered"
                   for j in bad}
        _fail("assert_recovers", case, bad, details, x=x, cost=cost)


def assert_same_solution(result, expected, problem, *, compare="x", rtol=RTOL,
                         names=("result", "expected")):
    """Two solver outputs agree per RHS: same ``x`` (``compare="x"``) or same cost.

    With ``compare="x"`` the reported costs must also agree within ``rtol``.

    Parameters
    ----------
    result, expected : BILSResult or array_like of int
        The two outputs (anything with ``.x`` and optionally ``.cost``, or a bare ``x``).
    problem : ProblemCase, BILSProblem or tuple
        The problem both solve: see :func:`~bils.testing.as_case`.
    compare : {"x", "cost"}, default "x"
        ``"x"``: the points must be equal (and the reported costs agree); ``"cost"``:
        only their costs must agree (ties allowed).
    rtol : float, default 1e-9
        Relative tolerance on costs, relative to ``||y_j||² + ||R z_j||²`` per RHS.
    names : (str, str), default ("result", "expected")
        How the two outputs are called in the failure message.

    Raises
    ------
    AssertionError
        If the outputs disagree for some RHS (showing the smallest failing RHS and
        both points).

    Examples
    --------
    >>> import numpy as np, bils
    >>> from bils.testing import assert_same_solution
    >>> R = np.array([[2.0, 1.0], [0.0, 1.0]])
    >>> problem = (R, np.array([[3.125, 0.25], [0.875, -1.375]]), -2, 2)  # (R, Y, lo, hi)
    >>> from bils.testing import babai_textbook, exact_solve
    >>> res = bils.babai(*problem, backend="numpy")
    >>> assert_same_solution(res, babai_textbook(*problem), problem)
    >>> opt = bils.enumerate(*problem, backend="numpy")
    >>> assert_same_solution(opt, exact_solve(*problem), problem, compare="cost")
    >>> assert_same_solution(res, opt, problem, names=("babai", "enumerate"))
    Traceback (most recent call last):
        ...
    AssertionError: assert_same_solution: 1 of 2 right-hand side(s) fail; smallest counterexample is RHS 1
    babai: x = [1, -1] cost 0.703125, reported 0.703125
    enumerate: x = [1, -2] cost 0.453125, reported 0.453125
    ...
    """
    _check_compare(compare)
    case = as_case(problem)
    xa, ca, _ = unpack_result(result, case)
    xb, cb, _ = unpack_result(expected, case)
    _compare_pair(case, xa, ca, xb, cb, compare, rtol, "assert_same_solution", names)


def _compare_pair(case, xa, ca, xb, cb, compare, rtol, title, names, extra=""):
    ra, rb = case.cost(xa), case.cost(xb)
    tol = case.cost_tolerance(xa, rtol) + case.cost_tolerance(xb, rtol)
    cost_bad = ~(np.abs(ra - rb) <= tol)
    if ca is not None and cb is not None:
        cost_bad |= ~(np.abs(ca - cb) <= tol)
    bad_mask = cost_bad | (np.any(xa != xb, axis=0) if compare == "x" else False)
    bad = np.flatnonzero(bad_mask)
    if bad.size:
        na, nb = names
        details = {}
        for j in bad:
            rep_a = "" if ca is None else f", reported {float(ca[j])!r}"
            rep_b = "" if cb is None else f", reported {float(cb[j])!r}"
            details[int(j)] = (f"{na}: x = {xa[:, j].tolist()} cost {float(ra[j])!r}{rep_a}\n"
                               f"{nb}: x = {xb[:, j].tolist()} cost {float(rb[j])!r}{rep_b}")
        _fail(title, case, bad, details, x=xa, cost=ca, extra=extra)


# --------------------------------------------------------------------------- solver checks
def _reset(solver):
    reset = getattr(solver, "reset", None)
    if callable(reset):
        reset()


def assert_multi_rhs_consistent(solver, problem, *, compare="x", rtol=RTOL):
    """Solving all right-hand sides at once equals a loop over the columns.

    Calls ``solver`` once on the whole problem, then once per column (as a 1-RHS 2-D
    problem) in column order. A solver with a ``reset()`` method (such as
    :class:`~bils.testing.threaded_rng`) is reset before the batch and before the loop,
    so a randomised solver that draws its per-RHS seeds in column order from one
    generator can be checked too. ``compare="cost"`` accepts different points of equal
    cost (ties).

    Parameters
    ----------
    solver : callable
        ``solver(R, Y, lo, hi, /, *, scale=None, offset=None)`` returning a
        :class:`bils.BILSResult` (or ``x``); bind options with :func:`functools.partial`.
    problem : ProblemCase, BILSProblem or tuple
        The problem, usually with several right-hand sides: see
        :func:`~bils.testing.as_case`.
    compare : {"x", "cost"}, default "x"
        ``"x"``: the points must be equal (and the reported costs agree); ``"cost"``:
        only their costs must agree (ties allowed).
    rtol : float, default 1e-9
        Relative tolerance on costs, relative to ``||y_j||² + ||R z_j||²`` per RHS.

    Raises
    ------
    AssertionError
        If the batch and the loop disagree for some RHS (showing the smallest failing
        RHS).

    Examples
    --------
    >>> import numpy as np, bils
    >>> from bils.testing import assert_multi_rhs_consistent
    >>> R = np.array([[2.0, 1.0], [0.0, 1.0]])
    >>> problem = (R, np.array([[3.125, 0.25], [0.875, -1.375]]), -2, 2)  # (R, Y, lo, hi)
    >>> import functools
    >>> assert_multi_rhs_consistent(functools.partial(bils.babai, backend="numpy"), problem)
    >>> from bils.testing import threaded_rng
    >>> klein = threaded_rng(bils.klein, 0, n_samples=4, backend="numpy")
    >>> assert_multi_rhs_consistent(klein, problem)
    """
    _check_compare(compare)
    case = as_case(problem)
    _reset(solver)
    xb, cb, _ = unpack_result(case.solve(solver), case)
    _reset(solver)
    xl = np.empty_like(xb)
    cl = None if cb is None else np.empty(case.k)
    for j in range(case.k):
        sub = case.column(j)
        xj, cj, _ = unpack_result(sub.solve(solver), sub)
        xl[:, j] = xj[:, 0]
        if cl is not None and cj is not None:
            cl[j] = cj[0]
    _compare_pair(case, xb, cb, xl, cl, compare, rtol, "assert_multi_rhs_consistent",
                  ("all RHS at once", "one RHS at a time"))


def assert_translation_equivariant(solver, problem, shift, *, compare="x", rtol=RTOL):
    r"""Moving the problem by an integer vector moves the solution by the same vector.

    With ``t = shift`` (broadcastable to (n, k)), the problem ``Y + R (S∘t)`` over
    ``[lo + t, hi + t]`` must give ``x + t`` (``compare="x"``) or a point of the same
    cost (``compare="cost"``). ``x`` comparisons catch tie rules that are not
    translation invariant (round-half-to-even, say) on problems with exact ties.

    Parameters
    ----------
    solver : callable
        ``solver(R, Y, lo, hi, /, *, scale=None, offset=None)`` returning a
        :class:`bils.BILSResult` (or ``x``); bind options with :func:`functools.partial`.
    problem : ProblemCase, BILSProblem or tuple
        The problem: see :func:`~bils.testing.as_case`.
    shift : (n,) or (n, k) array_like of int
        The integer translation ``t``.
    compare : {"x", "cost"}, default "x"
        ``"x"``: the points must be equal (and the reported costs agree); ``"cost"``:
        only their costs must agree (ties allowed).
    rtol : float, default 1e-9
        Relative tolerance on costs, relative to ``||y_j||² + ||R z_j||²`` per RHS.

    Raises
    ------
    AssertionError
        If the moved problem's solution, shifted back, differs for some RHS (showing
        the smallest failing RHS and the shift).

    Examples
    --------
    >>> import numpy as np, bils
    >>> from bils.testing import assert_translation_equivariant
    >>> R = np.array([[2.0, 1.0], [0.0, 1.0]])
    >>> problem = (R, np.array([[3.125, 0.25], [0.875, -1.375]]), -2, 2)  # (R, Y, lo, hi)
    >>> import functools
    >>> babai = functools.partial(bils.babai, backend="numpy")
    >>> assert_translation_equivariant(babai, problem, np.array([1, -1]))
    >>> def round_half_even(R, Y, lo, hi, *, scale=None, offset=None):  # diagonal R only
    ...     return np.clip(np.round(Y / np.diag(R)[:, None]), lo, hi).astype(np.int64)
    >>> tie = (np.eye(2), np.array([[0.5], [1.5]]), -3, 3)
    >>> assert_translation_equivariant(round_half_even, tie, np.array([1, 0]))
    Traceback (most recent call last):
        ...
    AssertionError: assert_translation_equivariant: 1 of 1 right-hand side(s) fail; smallest counterexample is RHS 0
    original problem: x = [0, 2] cost 0.5
    moved problem, shifted back: x = [1, 2] cost 0.5
    ...
    """
    _check_compare(compare)
    case = as_case(problem)
    moved = case.translate(shift)
    t = np.broadcast_to(np.asarray(shift, dtype=np.int64).reshape(
        (case.n, 1) if np.ndim(shift) == 1 else np.shape(shift)), (case.n, case.k))
    _reset(solver)
    x0, c0, _ = unpack_result(case.solve(solver), case)
    _reset(solver)
    x1, c1, _ = unpack_result(moved.solve(solver), moved)
    # compare in the original frame: x1 - t solves the original problem
    xs = x1 - t
    extra = (lambda j: f"shift t = {t[:, j].tolist()}; moved problem returned "
                       f"x = {x1[:, j].tolist()} (minus t: {xs[:, j].tolist()})")
    _compare_pair(case, x0, c0, xs, c1, compare, rtol, "assert_translation_equivariant",
                  ("original problem", "moved problem, shifted back"), extra=extra)
