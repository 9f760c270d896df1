"""The fused whole-array passes (``bils._numba.passes``) against numpy.

Validation of large problems reads each array once in a numba pass (finiteness,
triangularity, row sums, per-row/per-column magnitude ranges), checks outputs and
un-permutes results in parallel. Each pass is compared here with the numpy code it
replaces, and every validation message is pinned on both paths (the fused one forced on
small inputs by lowering ``FUSED_MIN_SIZE``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import bils
import bils._guard as guard
from bils._guard import _abs_range, _max_row_abs_sum
from bils._validate import problem_iv

numba = pytest.importorskip("numba")
from bils._numba import passes  # noqa: E402


def _array(rng, shape, kind):
    V = rng.normal(0, 3, shape)
    if kind == "positive":
        V = np.abs(V) + 0.1
    elif kind == "negative":
        V = -np.abs(V) - 0.1
    elif kind == "zeros":
        V[rng.random(shape) < 0.2] = 0.0
    return V


@pytest.mark.parametrize("shape", [(1, 1), (3, 700), (257, 5), (40, 513)])
@pytest.mark.parametrize("kind", ["mixed", "positive", "negative", "zeros"])
def test_array_stats_equal_numpy(shape, kind):
    V = _array(np.random.default_rng(shape[0] * shape[1]), shape, kind)
    bad, rmin, rmax, cmax = passes.array_stats(V)
    assert not bad
    emin, emax = _abs_range(V, axis=1)
    np.testing.assert_array_equal(rmin, emin)
    np.testing.assert_array_equal(rmax, emax)
    np.testing.assert_array_equal(cmax, _abs_range(V, axis=0)[1])
    bad, rmin, rmax, cmax2 = passes.array_stats(V, rows=False)
    assert not bad and rmin is None and rmax is None
    np.testing.assert_array_equal(cmax2, cmax)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [(0, 0), (5, 299), (9, 256)])
def test_array_stats_non_finite(value, where):
    V = np.ones((10, 300))
    V[where] = value
    assert passes.array_stats(V)[0] and passes.array_stats(V, rows=False)[0]


@pytest.mark.parametrize("n", [1, 2, 33, 300])
def test_matrix_stats(n):
    rng = np.random.default_rng(n)
    R = np.triu(rng.normal(0, 1, (n, n))) + np.eye(n)
    bad, lower, rowsum = passes.matrix_stats(R)
    assert not bad and not lower
    assert rowsum == pytest.approx(_max_row_abs_sum(R), rel=1e-13)
    if n > 1:
        L = R.copy()
        L[n - 1, 0] = 1e-300  # the smallest entry below the diagonal still counts
        assert passes.matrix_stats(L)[1]
    for v in (np.nan, np.inf):
        B = R.copy()
        B[n // 2, n - 1] = v
        assert passes.matrix_stats(B)[0]


@pytest.mark.parametrize("lo_shape, hi_shape", [((1, 1), (1, 1)), ((30, 1), (1, 1)),
                                                ((1, 20), (30, 20)), ((30, 20), (30, 1))])
def test_codes_in_box(lo_shape, hi_shape):
    rng = np.random.default_rng(0)
    lo = rng.integers(-3, 1, lo_shape)
    hi = rng.integers(2, 6, hi_shape)
    x = np.clip(rng.integers(-4, 8, (30, 20)), np.broadcast_to(lo, (30, 20)), np.broadcast_to(hi, (30, 20)))
    assert passes.codes_in_box(x, lo, hi)
    for i, j, d in ((0, 0, -1), (29, 19, 1), (7, 11, 1)):
        y = x.copy()
        y[i, j] = (np.broadcast_to(lo, (30, 20))[i, j] - 1 if d < 0
                   else np.broadcast_to(hi, (30, 20))[i, j] + 1)
        assert not passes.codes_in_box(y, lo, hi)


def test_scatter_rows():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 100, (50, 7))
    perm = rng.permutation(50)
    expect = np.empty_like(x)
    expect[perm] = x
    np.testing.assert_array_equal(passes.scatter_rows(x, perm), expect)


# --------------------------------------------------------------------------- messages
R2 = np.array([[2.0, 1.0], [0.0, 1.0]])
Y2 = np.array([[1.2, 0.3], [2.9, -1.0]])
BAD = [
    ("R nan", dict(R=np.array([[np.nan, 1.0], [0.0, 1.0]])), "`R` must be finite"),
    ("R lower", dict(R=np.array([[2.0, 1.0], [1e-300, 1.0]])), "`R` must be upper triangular"),
    ("R zero diagonal", dict(R=np.array([[2.0, 1.0], [0.0, 0.0]])), "`R` must have a non-zero diagonal"),
    ("Y inf", dict(Y=np.array([[1.0, np.inf], [0.0, 1.0]])), "`Y` must be finite"),
    ("scale nan", dict(scale=np.array([[1.0, np.nan], [1.0, 1.0]])), "`scale` must be finite"),
    ("scale zero", dict(scale=np.array([[1.0, 0.0], [1.0, 1.0]])), "`scale` must be non-zero"),
    ("offset inf", dict(offset=np.array([[0.0, 0.0], [-np.inf, 0.0]])), "`offset` must be finite"),
    ("lo > hi", dict(lo=np.array([[0, 4], [0, 0]])), "`lo` must not exceed `hi`"),
    ("overflow", dict(Y=np.array([[1e306, 0.0], [0.0, 1.0]])), "magnitudes overflow float64"),
    ("weights", dict(scale=np.array([[1e-160, 1.0], [1.0, 1.0]])), "level weights"),
]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("what, change, message", BAD, ids=[b[0] for b in BAD])
def test_messages_on_both_paths(what, change, message, fused, monkeypatch):
    monkeypatch.setattr(guard, "FUSED_MIN_SIZE", 1 if fused else 1 << 62)
    args = dict(R=R2, Y=Y2, lo=0, hi=3, scale=np.ones((2, 2)), offset=np.zeros((2, 2)))
    args.update(change)
    with pytest.raises(ValueError, match=message):
        problem_iv(args["R"], args["Y"], args["lo"], args["hi"], args["scale"], args["offset"])


def test_fused_and_numpy_paths_agree(monkeypatch):
    """The same canonical problem and the same reductions (row sums to rounding) either way."""
    rng = np.random.default_rng(3)
    n, k = 40, 30
    R = np.triu(rng.normal(0, 1, (n, n))) + 3 * np.eye(n)
    Y = rng.normal(0, 5, (n, k))
    S = bils.GroupedGrid(rng.uniform(0.1, 1, (4, k)), np.arange(n) % 4)
    O = rng.normal(0, 1, (n, k))
    cans = {}
    for fused in (False, True):
        monkeypatch.setattr(guard, "FUSED_MIN_SIZE", 1 if fused else 1 << 62)
        cans[fused] = problem_iv(R, Y, -2, 5, S, O)
    a, b = cans[False].magnitudes, cans[True].magnitudes
    for f in dataclasses.fields(a):
        np.testing.assert_allclose(getattr(b, f.name), getattr(a, f.name), rtol=1e-13)
    np.testing.assert_array_equal(cans[True].offset.values, cans[False].offset.values)


def test_magnitudes_not_carried_by_replace():
    can = problem_iv(R2, Y2, 0, 3)
    assert can.magnitudes is not None
    sub = dataclasses.replace(can, Y=can.Y[:, :1])
    assert sub.magnitudes is None and can.astype(np.float32).magnitudes is None


def test_large_problem_solves_through_fused_passes():
    """Above ``FUSED_MIN_SIZE`` (a full grid, an ordering: validation, output check and
    un-permutation take the fused passes) the numba result equals the numpy reference."""
    rng = np.random.default_rng(5)
    n, k = 300, 260  # n * k > 2**16
    assert n * k >= guard.FUSED_MIN_SIZE
    A = rng.normal(0, 1, (2 * n, n))
    H = A.T @ A
    W = rng.normal(0, 1, (k, n))
    S = rng.uniform(0.05, 0.2, (n, k))
    O = -4 * S
    prob = bils.BILSProblem.from_gram(H, W.T, 0, 7, scale=S, offset=O, ordering="diag")
    a = bils.babai(prob, backend="numpy")
    b = bils.babai(prob, backend="numba")
    np.testing.assert_array_equal(b.x, a.x)
    np.testing.assert_allclose(b.cost, a.cost, rtol=1e-9)
    c = bils.babai(prob, backend="numba", precision="float32")
    assert np.mean(c.x == a.x) > 0.99
