"""Grouped grids (:class:`bils.GroupedGrid`): validation, and the same codes as the dense form.

Every solver and backend must give identical codes for a grid passed grouped (values per
(group, RHS) plus a group map) and the same grid passed as full (n, k) arrays, in every
ordering; the oracle is the numpy reference on the dense arrays.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bils
from bils import GroupedGrid
from bils._validate import problem_iv

SOLVERS = {
    "babai": (bils.babai, {}),
    "babai32": (bils.babai, {"precision": "float32"}),
    "klein": (bils.klein, {"n_samples": 4, "rng": 3}),
    "kbest": (bils.kbest, {"beam_width": 4}),
}
ORDERINGS = ("natural", "diag", "sqrd", "chang_han")


def grouped_problem(n, k, group_size, seed, *, shared=False, shuffle=False, box=(0, 7)):
    """``R, Y`` and grouped ``scale``/``offset`` with ``Y`` near grid points (no near-ties)."""
    rng = np.random.default_rng(seed)
    R = np.triu(rng.normal(0, 0.3, (n, n)), 1) + np.diag(rng.uniform(1.0, 2.0, n))
    g = -(-n // group_size)
    groups = np.arange(n) // group_size
    if shuffle:
        groups = rng.permutation(groups)
    kk = 1 if shared else k
    S = GroupedGrid(rng.uniform(0.5, 1.5, (g, kk)), groups)
    O = GroupedGrid(rng.uniform(-3.0, 0.0, (g, kk)), groups)
    x = rng.integers(box[0], box[1] + 1, (n, k))
    noise = rng.uniform(-0.3, 0.3, (n, k))  # centres stay 0.2 away from rounding boundaries
    Y = R @ (S.dense(k) * (x + noise) + O.dense(k))
    return R, Y, box[0], box[1], S, O


def _run(fn, prob, backend, grouped, **kw):
    R, Y, lo, hi, S, O = prob
    if grouped:
        return fn(R, Y, lo, hi, scale=S, offset=O, backend=backend, **kw)
    return fn(R, Y, lo, hi, scale=S.dense(Y.shape[1]), offset=O.dense(Y.shape[1]),
              backend=backend, **kw)


# ---------------------------------------------------------------------- the class
def test_from_group_size_and_dense():
    V = np.arange(6.0).reshape(3, 2)
    S = GroupedGrid.from_group_size(V, 2, 5)
    assert S.groups.tolist() == [0, 0, 1, 1, 2]
    assert S.shape == (5, 2) and S.n_groups == 3
    np.testing.assert_array_equal(S.dense(), V[[0, 0, 1, 1, 2]])
    np.testing.assert_array_equal(S.col(1), V[[0, 0, 1, 1, 2], 1])
    np.testing.assert_array_equal(S.row(3), V[1])
    shared = GroupedGrid([1.0, 2.0], [1, 0, 1])
    assert shared.dense(4).shape == (3, 4) and shared.dense(4)[0].tolist() == [2.0] * 4
    with pytest.raises(AttributeError):
        S.values = V
    import pickle

    S2 = pickle.loads(pickle.dumps(S))
    np.testing.assert_array_equal(S2.dense(), S.dense())
    assert not S.values.flags.writeable and not S.groups.flags.writeable


@pytest.mark.parametrize("values, groups, exc, match", [
    (np.ones((2, 3)), [0, 2], ValueError, r"`groups` must lie in \[0, 2\)"),
    (np.ones((2, 3)), [0, -1], ValueError, r"`groups` must lie in"),
    (np.ones((2, 3)), [0.0, 1.0], TypeError, "`groups` must hold integers"),
    (np.ones((2, 3)), [[0, 1]], ValueError, "`groups` must be a non-empty 1-D array"),
    (np.ones((2, 3, 1)), [0, 1], ValueError, r"`values` must be a non-empty \(g,\) or \(g, k\)"),
    (np.array([[1.0, np.nan]]), [0], ValueError, "`values` must be finite"),
    (np.array([["a"]]), [0], TypeError, "must hold real numbers"),
])
def test_grouped_grid_validation(values, groups, exc, match):
    with pytest.raises(exc, match=match):
        GroupedGrid(values, groups)


def test_from_group_size_rows():
    with pytest.raises(ValueError, match=r"`values` must have ceil\(n / group_size\) = 3 rows"):
        GroupedGrid.from_group_size(np.ones((2, 1)), 2, 5)
    with pytest.raises(ValueError, match="`group_size` must be >= 1"):
        GroupedGrid.from_group_size(np.ones((2, 1)), 0, 5)


def test_solver_validation():
    R, Y = np.eye(4), np.ones((4, 3))
    S = GroupedGrid(np.ones((2, 3)), [0, 0, 1])
    with pytest.raises(ValueError, match=r"`scale` \(a GroupedGrid\) must have one group index per row of `Y` \(4\), got 3"):
        bils.babai(R, Y, 0, 3, scale=S, backend="numpy")
    S = GroupedGrid(np.ones((2, 2)), [0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"`offset` \(a GroupedGrid\) must have values of shape \(g, 3\)"):
        bils.babai(R, Y, 0, 3, offset=S, backend="numpy")
    with pytest.raises(ValueError, match="`scale` must be non-zero"):
        bils.babai(R, Y, 0, 3, scale=GroupedGrid([1.0, 0.0], [0, 0, 1, 1]), backend="numpy")
    with pytest.raises(TypeError, match=r"write `scale=bils.GroupedGrid\(values, groups\)`"):
        bils.babai(R, Y, 0, 3, scale=(np.ones((2, 3)), [0, 0, 1, 1]), backend="numpy")


def test_canonical_dense_grids_and_premultiply():
    R, Y, lo, hi, S, O = grouped_problem(9, 4, 4, seed=1, shuffle=True)
    can = problem_iv(R, Y, lo, hi, S, O)
    Sd, Od = can.dense_grids()
    assert Sd.shape == Od.shape == (9, 4)
    np.testing.assert_array_equal(Sd, S.dense())
    np.testing.assert_array_equal(Od, O.dense())
    np.testing.assert_allclose(O.premultiply(R), R @ O.dense(), rtol=1e-13, atol=1e-13)
    # plain arrays become grids too: per-RHS (1, k) -> one group; dense -> identity map
    can = problem_iv(R, Y, lo, hi, np.full((1, 4), 2.0), O.dense())
    assert can.scale.n_groups == 1 and can.offset.is_identity
    np.testing.assert_array_equal(can.dense_grids()[0], np.full((9, 4), 2.0))


def test_lls_tau_grouped_equals_dense():
    from bils.klein import lls_tau

    R, Y, lo, hi, S, O = grouped_problem(10, 5, 3, seed=2, shuffle=True)
    np.testing.assert_array_equal(lls_tau(R, S, 8), lls_tau(R, S.dense(), 8))


# ---------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("shared, shuffle", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("n, k, group_size", [(1, 1, 1), (13, 6, 4), (70, 40, 16)])
def test_grouped_equals_dense(solver, shared, shuffle, n, k, group_size):
    fn, kw = SOLVERS[solver]
    prob = grouped_problem(n, k, group_size, seed=n * 31 + k, shared=shared, shuffle=shuffle)
    ref = _run(fn, prob, "numpy", grouped=False, **kw)
    for backend in ("numpy", "numba"):
        for grouped in (True, False):
            res = _run(fn, prob, backend, grouped=grouped, **kw)
            what = f"{solver} {backend} grouped={grouped}"
            np.testing.assert_array_equal(res.x, ref.x, err_msg=what)
            rtol = 2e-4 if solver == "babai32" else 1e-9
            np.testing.assert_allclose(res.cost, ref.cost, rtol=rtol, atol=1e-9, err_msg=what)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_enumerate_grouped_equals_dense(backend):
    prob = grouped_problem(8, 5, 3, seed=4, shuffle=True, box=(0, 3))
    ref = _run(bils.enumerate, prob, "numpy", grouped=False)
    res = _run(bils.enumerate, prob, backend, grouped=True)
    np.testing.assert_array_equal(res.x, ref.x)
    np.testing.assert_allclose(res.cost, ref.cost, rtol=1e-10)


@pytest.mark.parametrize("ordering", ORDERINGS)
def test_from_gram_orderings_permute_the_group_map(ordering):
    rng = np.random.default_rng(5)
    n, k, gs = 24, 6, 8
    A = rng.standard_normal((n, 3 * n)) * np.exp(rng.standard_normal((n, 1)))
    H = A @ A.T
    T = rng.standard_normal((n, k))
    S = GroupedGrid.from_group_size(rng.uniform(0.2, 0.5, (n // gs, k)), gs, n)
    O = GroupedGrid.from_group_size(-3.5 * S.values, gs, n)
    pg = bils.BILSProblem.from_gram(H, T, 0, 7, scale=S, offset=O, damp=0.01, ordering=ordering)
    pd = bils.BILSProblem.from_gram(H, T, 0, 7, scale=S.dense(), offset=O.dense(), damp=0.01,
                                    ordering=ordering)
    if ordering != "chang_han":
        assert isinstance(pg.scale, GroupedGrid) and pg.scale.values.shape == (n // gs, k)
        if pg.perm is not None:
            np.testing.assert_array_equal(pg.scale.groups, S.groups[pg.perm])
    ref = bils.babai(pd, backend="numpy")
    for backend in ("numpy", "numba"):
        res = bils.babai(pg, backend=backend)
        np.testing.assert_array_equal(res.x, ref.x, err_msg=backend)
        np.testing.assert_allclose(res.cost, ref.cost, rtol=1e-9)
        np.testing.assert_allclose(pg.cost(res.x), res.cost, rtol=1e-9)


@settings(max_examples=25)
@given(n=st.integers(1, 40), k=st.integers(1, 12), group_size=st.integers(1, 16),
       seed=st.integers(0, 2**32 - 1), shared=st.booleans(), shuffle=st.booleans(),
       solver=st.sampled_from(["babai", "klein", "kbest"]))
def test_property_grouped_codes_identical_across_backends(n, k, group_size, seed, shared,
                                                          shuffle, solver):
    fn, kw = SOLVERS[solver]
    prob = grouped_problem(n, k, group_size, seed, shared=shared, shuffle=shuffle)
    ref = _run(fn, prob, "numpy", grouped=False, **kw)
    for backend, grouped in (("numpy", True), ("numba", True), ("numba", False)):
        res = _run(fn, prob, backend, grouped=grouped, **kw)
        np.testing.assert_array_equal(res.x, ref.x, err_msg=f"{backend} grouped={grouped}")
        np.testing.assert_allclose(res.cost, ref.cost, rtol=1e-9, atol=1e-9)


@settings(max_examples=25)
@given(n=st.integers(1, 30), k=st.integers(1, 6), g=st.integers(1, 8),
       seed=st.integers(0, 2**32 - 1))
def test_property_premultiply_and_permuted(n, k, g, seed):
    rng = np.random.default_rng(seed)
    grid = GroupedGrid(rng.standard_normal((g, k)), rng.integers(0, g, n))
    R = rng.standard_normal((5, n))
    np.testing.assert_allclose(grid.premultiply(R), R @ grid.dense(), rtol=1e-12, atol=1e-12)
    perm = rng.permutation(n)
    np.testing.assert_array_equal(grid.permuted(perm).dense(), grid.dense()[perm])


@pytest.mark.parametrize("ctor", ["from_triangular", "from_design"])
@pytest.mark.parametrize("ordering", ["natural", "sqrd", "chang_han"])
def test_triangular_and_design_orderings(ctor, ordering):
    R, Y, lo, hi, S, O = grouped_problem(12, 4, 5, seed=9, shuffle=True)
    if ctor == "from_triangular":
        args = (R, Y)
    else:
        A = np.vstack([R, np.random.default_rng(1).normal(0, 0.1, (3, 12))])
        args = (A, A @ np.linalg.solve(R, Y))
    make = getattr(bils.BILSProblem, ctor)
    pg = make(*args, lo, hi, scale=S, offset=O, ordering=ordering)
    pd = make(*args, lo, hi, scale=S.dense(4), offset=O.dense(4), ordering=ordering)
    ref = bils.babai(pd, backend="numpy")
    for backend in ("numpy", "numba"):
        res = bils.babai(pg, backend=backend)
        np.testing.assert_array_equal(res.x, ref.x, err_msg=backend)
        np.testing.assert_allclose(res.cost, ref.cost, rtol=1e-9)
