"""BILSProblem constructors and column orderings.

* every ordering returns results in the caller's original coordinate order (checked on
  the *original* problem with the bils.testing oracles);
* ordering permutations are valid and follow their greedy rules (checked independently);
* Chang–Han orders per RHS;
* from_design reports the true residual, including the part outside range(A);
* from_gram applies damping and handles dead columns as GPTQ does.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bils
from bils.ordering import ORDERINGS, chang_han, column_order
from bils.testing import (
    ProblemCase,
    assert_cost_consistent,
    assert_feasible,
    assert_optimal,
    assert_same_solution,
    brute_force,
)
from bils.testing.strategies import bils_problems, layer_problems, make_gram

ALL_ORDERINGS = ORDERINGS + ("chang_han",)
small = bils_problems(max_n=5, max_k=3, max_box_points=2048)

babai = functools.partial(bils.babai, backend="numpy")
enumerate_ = functools.partial(bils.enumerate, backend="numpy")


def _spd(rng, n):
    return make_gram(rng, n, correlation=0.7) + 0.05 * np.eye(n)


# --------------------------------------------------------------------------- original order
@given(case=small, ordering=st.sampled_from(ALL_ORDERINGS))
@settings(max_examples=150)
def test_results_are_in_the_callers_order(case, ordering):
    p = case.problem(ordering)
    ex = enumerate_(p)
    # checked against the original, un-ordered problem
    assert_feasible(ex, case)
    assert_cost_consistent(ex, case)
    assert_optimal(ex, case)
    ba = babai(p)
    assert_feasible(ba, case)
    assert_cost_consistent(ba, case)
    np.testing.assert_allclose(p.cost(ba.x), ba.cost, rtol=1e-9, atol=1e-9)


@given(case=small, ordering=st.sampled_from(ORDERINGS[1:]))
@settings(max_examples=100)
def test_ordered_babai_is_babai_on_the_permuted_problem(case, ordering):
    p = case.problem(ordering)
    perm = p.perm
    assert perm is not None and perm.shape == (case.n,)
    # independent construction: QR of R[:, perm], targets Qᵀ Y, grid rows permuted
    Q, Rp = np.linalg.qr(case.R[:, perm])
    sgn = np.where(np.diag(Rp) < 0, -1.0, 1.0)
    Rp, Q = sgn[:, None] * Rp, Q * sgn[None, :]
    full = {name: np.asarray(case.full(name))[perm] for name in ("lo", "hi", "scale", "offset")}
    ref = bils.babai(np.triu(Rp), Q.T @ case.Y, full["lo"], full["hi"], scale=full["scale"],
                     offset=full["offset"], backend="numpy")
    xo = np.empty_like(ref.x)
    xo[perm] = ref.x
    assert_same_solution(babai(p), SimpleNamespace(x=xo, cost=ref.cost), case,
                         names=(f"babai(ordering={ordering!r})", "babai on permuted problem"))


def test_squeezed_rhs_with_an_ordering():
    rng = np.random.default_rng(1)
    R = np.triu(rng.uniform(-0.5, 0.5, (4, 4)), 1) + np.diag([0.5, 1.0, 2.0, 1.5])
    y = R @ np.array([1.2, 0.4, 2.6, 3.1])
    for ordering in ALL_ORDERINGS:
        p = bils.BILSProblem.from_triangular(R, y, 0, 3, ordering=ordering)
        res = enumerate_(p)
        assert res.x.shape == (4,) and np.ndim(res.cost) == 0
        bf = brute_force(R, y, 0, 3)
        np.testing.assert_allclose(res.cost, bf.cost, rtol=1e-9)


# --------------------------------------------------------------------------- permutations
@pytest.mark.parametrize("method", ORDERINGS)
@pytest.mark.parametrize("seed", range(5))
def test_orderings_are_permutations(method, seed):
    rng = np.random.default_rng(seed)
    n = 3 + seed * 3
    perm = column_order(_spd(rng, n), method)
    assert perm.dtype == np.int64 and perm.shape == (n,)
    np.testing.assert_array_equal(np.sort(perm), np.arange(n))


def test_natural_and_diag():
    G = np.diag([3.0, 1.0, 2.0, 5.0])
    np.testing.assert_array_equal(column_order(G, "natural"), [0, 1, 2, 3])
    perm = column_order(G, "diag")
    assert np.all(np.diff(np.diag(G)[perm]) >= 0)  # largest diagonal decided first (last)
    # equal diagonals keep GPTQ's (stable) order: the earlier column is decided first
    perm = column_order(np.eye(3), "diag")
    np.testing.assert_array_equal(perm, [2, 1, 0])


def _residual_norms(A, chosen, remaining):
    """Norm of each remaining column of A after projecting out the chosen columns."""
    if chosen:
        Q, _ = np.linalg.qr(A[:, chosen])
        P = A[:, remaining] - Q @ (Q.T @ A[:, remaining])
    else:
        P = A[:, remaining]
    return np.linalg.norm(P, axis=0)


@pytest.mark.parametrize("seed", range(6))
def test_sqrd_vblast_minpivot_follow_their_greedy_rules(seed):
    rng = np.random.default_rng(seed)
    n = 6
    A = rng.standard_normal((n + 3, n)) * np.exp(rng.standard_normal(n))
    G = A.T @ A
    # SQRD: front to back, smallest remaining residual column norm first
    perm = column_order(G, "sqrd")
    for p in range(n):
        rem = [j for j in range(n) if j not in perm[:p]]
        norms = _residual_norms(A, list(perm[:p]), rem)
        assert norms[rem.index(perm[p])] <= norms.min() * (1 + 1e-9)
    # V-BLAST / min-pivot: back to front, largest / smallest achievable r_pp of the
    # column placed last among the remaining ones
    for method, pick in (("vblast", np.max), ("minpivot", np.min)):
        perm = column_order(G, method)
        for p in range(n - 1, -1, -1):
            rem = list(perm[:p + 1])
            r_last = [_residual_norms(A, [c for c in rem if c != j], [j])[0] for j in rem]
            got = r_last[rem.index(perm[p])]
            assert abs(got - pick(r_last)) <= 1e-9 * max(1.0, pick(r_last)), method
        Rp = np.linalg.qr(A[:, perm])[1]
        assert np.isfinite(Rp).all()


def test_problem_factor_matches_the_permuted_gram():
    rng = np.random.default_rng(4)
    A = rng.standard_normal((9, 5))
    B = rng.standard_normal((9, 2))
    for ordering in ORDERINGS:
        p = bils.BILSProblem.from_design(A, B, -2, 2, ordering=ordering)
        perm = np.arange(5) if p.perm is None else p.perm
        np.testing.assert_allclose(p.R.T @ p.R, (A.T @ A)[np.ix_(perm, perm)], rtol=1e-10,
                                   atol=1e-10)
        assert np.all(np.tril(p.R, -1) == 0) and np.all(np.diag(p.R) != 0)


# --------------------------------------------------------------------------- Chang–Han
def _chang_han_first_choice(R, y, lo, hi):
    """Coordinate Chang–Han decides first: max |r_jj| * |c_j - second nearest box integer|."""
    G = R.T @ R
    Ginv = np.linalg.inv(G)
    c = Ginv @ (R.T @ y)
    r = 1.0 / np.sqrt(np.diag(Ginv))
    scores = []
    for j in range(len(c)):
        first = min(max(np.floor(c[j] + 0.5), lo), hi)
        cands = [v for v in (first - 1, first + 1) if lo <= v <= hi]
        second = min(cands, key=lambda v: abs(c[j] - v)) if cands else first
        scores.append(r[j] * abs(c[j] - second))
    return int(np.argmax(scores))


def test_chang_han_is_per_rhs():
    rng = np.random.default_rng(7)
    n, k = 5, 6
    R = np.triu(rng.uniform(-1, 1, (n, n)), 1) + np.diag(rng.uniform(0.5, 2, n))
    Y = R @ rng.uniform(-1, 4, (n, k))
    perm = chang_han(R, Y, 0, 3)
    assert perm.shape == (n, k) and perm.dtype == np.int64
    for j in range(k):
        np.testing.assert_array_equal(np.sort(perm[:, j]), np.arange(n))
        assert perm[-1, j] == _chang_han_first_choice(R, Y[:, j], 0, 3)
    assert len({tuple(perm[:, j]) for j in range(k)}) > 1, "one ordering for every RHS"
    # each column equals Chang–Han run on that RHS alone
    for j in range(k):
        np.testing.assert_array_equal(chang_han(R, Y[:, j], 0, 3)[:, 0], perm[:, j])
    p = bils.BILSProblem.from_triangular(R, Y, 0, 3, ordering="chang_han")
    np.testing.assert_array_equal(p.perm, perm)
    # per-RHS solve: each column is babai on its own re-ordered sub-problem
    res = babai(p)
    for j in range(k):
        Rj, yj, loj, hij, sj, oj, pj = p.rhs_subproblem(j)
        sub = bils.babai(Rj, yj, loj, hij, scale=sj, offset=oj, backend="numpy")
        np.testing.assert_array_equal(res.x[pj, j], sub.x)
        np.testing.assert_allclose(res.cost[j], sub.cost, rtol=1e-12)


@given(case=small)
@settings(max_examples=60)
def test_chang_han_problems_are_exact_with_enumerate(case):
    p = case.problem("chang_han")
    assert p.perm.shape == (case.n, case.k)
    res = enumerate_(p, n_best=2)
    assert_optimal(res, case)
    assert_cost_consistent(res, case)
    bx = np.asarray(res.info["best_x"]).reshape(2, case.n, case.k)
    np.testing.assert_array_equal(bx[0], np.asarray(res.x).reshape(case.n, case.k))


# --------------------------------------------------------------------------- from_design
@pytest.mark.parametrize("ordering", ALL_ORDERINGS)
def test_from_design_cost_includes_the_part_outside_range(ordering):
    rng = np.random.default_rng(3)
    A = rng.standard_normal((12, 4))
    B = A @ rng.integers(0, 4, (4, 3)) + 0.8 * rng.standard_normal((12, 3))
    scale = np.array([[0.5], [1.0], [2.0], [1.0]])
    offset = np.array([[0.1, -0.2, 0.0]])
    p = bils.BILSProblem.from_design(A, B, 0, 3, scale=scale, offset=offset, ordering=ordering)
    outside = np.sum(B**2, 0) - np.sum((np.linalg.qr(A)[0].T @ B) ** 2, 0)
    assert np.all(outside > 0.1)
    np.testing.assert_allclose(p.cost_offset, outside, rtol=1e-9)
    for solver in (babai, enumerate_):
        res = solver(p)
        true = np.sum((B - A @ (scale * res.x + offset)) ** 2, axis=0)
        np.testing.assert_allclose(res.cost, true, rtol=1e-9)
        np.testing.assert_allclose(p.cost(res.x), true, rtol=1e-9)
    # enumerate is the optimum of the true residual over the box
    bf = brute_force(p)
    np.testing.assert_allclose(enumerate_(p).cost, bf.cost, rtol=1e-9)


def test_from_design_square_has_no_offset():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((3, 3))
    p = bils.BILSProblem.from_design(A, rng.standard_normal(3), 0, 3)
    assert p.squeeze and abs(float(p.cost_offset[0])) < 1e-10


# --------------------------------------------------------------------------- from_gram
@pytest.mark.parametrize("ordering", ALL_ORDERINGS)
def test_from_gram_damping_and_dead_columns(ordering):
    rng = np.random.default_rng(2)
    n, m = 6, 4
    H = make_gram(rng, n, correlation=0.5)
    dead = np.array([False, True, False, False, True, False])
    H[dead, :] = 0.0
    H[:, dead] = 0.0
    T = rng.uniform(0.5, 2.5, (n, m))
    damp = 0.05
    p = bils.BILSProblem.from_gram(H, T, 0, 3, damp=damp, ordering=ordering)
    np.testing.assert_array_equal(p.dead, dead)
    Hd = H.copy()
    Hd[dead, dead] = 1.0
    Hd[np.diag_indices(n)] += damp * np.mean(np.diag(Hd))
    Td = np.where(dead[:, None], 0.0, T)
    if p.perm is not None and p.perm.ndim == 1:
        perm = p.perm
        np.testing.assert_allclose(p.R.T @ p.R, Hd[np.ix_(perm, perm)], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(p.Y, p.R @ Td[perm], rtol=1e-10, atol=1e-12)
    else:
        np.testing.assert_allclose(p.R.T @ p.R, Hd, rtol=1e-10, atol=1e-12)
    # costs are the damped quadratic form with dead targets at 0
    for solver in (babai, enumerate_):
        res = solver(p)
        E = Td - res.x
        np.testing.assert_allclose(res.cost, np.einsum("ij,ik,kj->j", E, Hd, E), rtol=1e-9)
        # a dead coordinate is decoupled: its best value is the box-rounded target 0
        assert np.all(res.x[dead] == 0)
    # damping is the same as adding it to H yourself
    p0 = bils.BILSProblem.from_gram(Hd, Td, 0, 3, damp=0.0, ordering=ordering)
    np.testing.assert_allclose(enumerate_(p0).cost, enumerate_(p).cost, rtol=1e-9)


def test_from_gram_dead_columns_with_a_grid():
    H = np.diag([2.0, 0.0, 1.0])
    T = np.array([[0.4], [5.0], [1.1]])
    p = bils.BILSProblem.from_gram(H, T, 0, 7, scale=0.5, offset=-1.0, damp=0.01)
    res = bils.enumerate(p, backend="numpy")
    # dead target 0 on the grid 0.5 * x - 1: x = 2
    assert int(res.x[1, 0]) == 2


@given(layer=layer_problems(max_n=6, max_m=3, bits=(2,)),
       ordering=st.sampled_from(ALL_ORDERINGS))
@settings(max_examples=60)
def test_layer_problems_in_every_ordering_are_exact(layer, ordering):
    p = layer.problem(ordering)
    res = enumerate_(p)
    assert_optimal(res, p)
    assert_cost_consistent(res, p)
    natural = enumerate_(layer.problem("natural"))
    np.testing.assert_allclose(res.cost, natural.cost, rtol=1e-8, atol=1e-10)


def test_problem_case_round_trip():
    rng = np.random.default_rng(9)
    R = np.triu(rng.uniform(-0.5, 0.5, (3, 3)), 1) + np.eye(3)
    case = ProblemCase(R, rng.standard_normal((3, 2)), np.zeros((1, 1), np.int64),
                       np.full((1, 1), 3))
    p = case.problem("natural")
    np.testing.assert_allclose(p.cost(np.ones((3, 2), int)), case.cost(np.ones((3, 2))))
