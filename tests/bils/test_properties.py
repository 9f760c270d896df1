"""The solver contract, applied to every solver and backend (one shared mixin).

Each property is a function of :mod:`bils.testing.contract` (the same code
:func:`bils.testing.check_solver` runs for users); this module only draws the examples
(:mod:`strategies`) and binds the solvers. Backends that are not available yet (a
solver without a numba kernel, numba not installed) are skipped, never failed.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bils
from bils.result import Status
from bils.testing import (
    ProblemCase,
    assert_never_worse_than,
    assert_optimal,
    assert_same_solution,
    contract,
    threaded_rng,
)
from bils.testing.oracles import babai_textbook, brute_force
from bils.testing.strategies import bils_problems, layer_problems, shifted_problems

BACKENDS = ("numpy", "numba")

# Examples: random triangular problems of every kind, plus layer-shaped ones.
problems = bils_problems(max_n=6, max_k=3)
cases = st.one_of(problems, layer_problems(max_n=8, max_m=3, bits=(2, 3)).map(
    lambda lay: lay.case()))
multi = bils_problems(max_n=6, min_k=2, max_k=4)
noiseless = bils_problems(max_n=6, max_k=3, targets=("noiseless",))
shifted = shifted_problems(problems)
small = bils_problems(max_n=5, max_k=3, max_box_points=4096)  # brute-forceable
small_multi = bils_problems(max_n=5, min_k=2, max_k=4, max_box_points=4096)
small_shifted = shifted_problems(small)

_AVAILABLE: dict = {}


def _require(solver, backend):
    """Skip when ``solver`` has no ``backend`` yet (probe once, on a 1x1 problem)."""
    key = (solver.__name__, backend)
    if key not in _AVAILABLE:
        try:
            solver(np.eye(1), np.zeros(1), 0, 1, backend=backend)
            _AVAILABLE[key] = None
        except (NotImplementedError, ImportError) as exc:
            _AVAILABLE[key] = str(exc)
    if _AVAILABLE[key] is not None:
        pytest.skip(f"{solver.__name__} backend {backend!r} not available: {_AVAILABLE[key]}")


def _bound(solver, backend, **options):
    _require(solver, backend)
    return functools.partial(solver, backend=backend, **options)


# which option set of a solver's ``variants`` an example uses (shrinks to the first)
variant_index = st.integers(0, 7)


@pytest.mark.parametrize("backend", BACKENDS)
class SolverContract:
    """Properties every solver has.

    Subclasses set ``solver`` and ``variants``, a tuple of option dicts; each example
    runs one of them.
    """

    solver = None
    variants: tuple = ({},)

    def bind(self, backend, v=0, **extra):
        options = {**self.variants[v % len(self.variants)], **extra}
        return _bound(type(self).solver, backend, **options)

    @given(case=cases, v=variant_index)
    def test_feasible(self, backend, case, v):
        contract.feasible(self.bind(backend, v), case)

    @given(case=cases, v=variant_index)
    def test_cost_consistent(self, backend, case, v):
        contract.cost_consistent(self.bind(backend, v), case)

    @given(case=multi, v=variant_index)
    @settings(max_examples=100)
    def test_multi_rhs_equals_loop(self, backend, case, v):
        contract.multi_rhs(self.bind(backend, v), case)

    @given(example=shifted, v=variant_index)
    def test_translation_equivariant(self, backend, example, v):
        contract.translation_equivariant(self.bind(backend, v), example)

    @given(case=noiseless, v=variant_index)
    def test_noiseless_recovery(self, backend, case, v):
        contract.noiseless_recovery(self.bind(backend, v), case)

    @given(case=cases, v=variant_index)
    def test_never_worse_than_babai(self, backend, case, v):
        contract.never_worse_than_babai(self.bind(backend, v), case)

    @given(case=cases, v=variant_index)
    @settings(max_examples=100)
    def test_backend_agrees_with_numpy(self, backend, case, v):
        if backend == "numpy":
            pytest.skip("reference backend")
        fast = case.solve(self.bind(backend, v))
        ref = case.solve(self.bind("numpy", v))
        # codes equal where there are no ties; on exact-tie problems compare costs
        assert_same_solution(fast, ref, case, compare="cost" if case.exact else "x",
                             names=(backend, "numpy"))


class TestBabai(SolverContract):
    solver = staticmethod(bils.babai)

    @given(case=cases)
    def test_matches_textbook_babai(self, backend, case):
        contract.matches_babai(self.bind(backend), case)

    @given(case=cases, block_size=st.integers(1, 9))
    def test_blocked_equals_unblocked(self, backend, case, block_size):
        blocked = case.solve(self.bind(backend, block_size=block_size))
        unblocked = case.solve(self.bind(backend, block_size=case.n))
        assert_same_solution(blocked, unblocked, case, names=(f"block_size={block_size}",
                                                               "unblocked"))

    @given(case=cases)
    def test_status_heuristic(self, backend, case):
        res = case.solve(self.bind(backend))
        assert np.all(np.asarray(res.status) == Status.HEURISTIC)
        assert res.solver == "babai" and res.backend == backend


class TestKlein(SolverContract):
    """Klein with a seeded generator threaded through calls (one seed per RHS, in order)."""

    solver = staticmethod(bils.klein)
    variants = ({"n_samples": 6}, {"n_samples": 6, "tau": 0.5}, {"n_samples": 3, "tau": 4.0})

    def bind(self, backend, v=0, **extra):
        _require(bils.klein, backend)
        options = {**self.variants[v % len(self.variants)], **extra}
        return threaded_rng(bils.klein, 1234, backend=backend, **options)

    @given(case=cases)
    @settings(max_examples=100)
    def test_no_samples_is_babai(self, backend, case):
        k0 = case.solve(self.bind(backend, n_samples=0))
        assert_same_solution(k0, case.solve(_bound(bils.babai, backend)), case,
                             names=("klein(n_samples=0)", "babai"))

    @given(case=cases)
    @settings(max_examples=100)
    def test_tau_zero_is_babai(self, backend, case):
        k0 = case.solve(self.bind(backend, tau=0.0))
        assert_same_solution(k0, case.solve(_bound(bils.babai, backend)), case,
                             names=("klein(tau=0)", "babai"))

    @given(case=cases, block_size=st.integers(1, 9))
    @settings(max_examples=100)
    def test_blocked_equals_unblocked(self, backend, case, block_size):
        blocked = case.solve(self.bind(backend, block_size=block_size))
        unblocked = case.solve(self.bind(backend, block_size=case.n))
        assert_same_solution(blocked, unblocked, case,
                             compare="cost" if case.exact else "x",
                             names=(f"block_size={block_size}", "unblocked"))

    @given(case=cases)
    @settings(max_examples=100)
    def test_same_rng_same_result(self, backend, case):
        a = case.solve(_bound(bils.klein, backend, rng=7, n_samples=4))
        b = case.solve(_bound(bils.klein, backend, rng=7, n_samples=4))
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.cost, b.cost)


def test_klein_auto_tau_is_finite_with_many_samples():
    # bils/klein.py lls_rho: when 2n <= log(n_samples) (n=1 with 8 samples) the equation
    # K = (e rho)^(2n/rho) has no root rho > 1, the bisection returns 1.0 and lls_tau
    # divides by log(1) = 0: tau = inf, i.e. uniform sampling over the box.
    with np.errstate(divide="raise"):
        res = bils.klein(np.eye(1) * 2.0, np.array([0.3]), -5, 5, n_samples=8, rng=0,
                         backend="numpy")
    assert np.all(np.isfinite(res.info["tau"])) and np.all(np.asarray(res.info["tau"]) > 0)


class TestKBest(SolverContract):
    solver = staticmethod(bils.kbest)
    variants = ({"beam_width": 4}, {"beam_width": 16, "n_children": 16},
                {"beam_width": 3, "n_children": 2})

    @given(case=cases, children=st.sampled_from([None, 1, 2, 16]))
    @settings(max_examples=100)
    def test_beam_one_is_babai_is_klein_zero(self, backend, case, children):
        kb = case.solve(self.bind(backend, beam_width=1, n_children=children))
        ba = case.solve(_bound(bils.babai, backend))
        assert_same_solution(kb, ba, case, names=("kbest(beam_width=1)", "babai"))
        _require(bils.klein, backend)
        kl = case.solve(_bound(bils.klein, backend, n_samples=0, rng=0))
        assert_same_solution(kl, ba, case, names=("klein(n_samples=0)", "babai"))



    @given(case=bils_problems(max_n=6, max_k=2, targets=("ties",)),
           beam=st.integers(1, 4), children=st.integers(1, 4))
    @settings(max_examples=100)
    def test_never_worse_than_babai_on_exact_ties(self, backend, case, beam, children):
        kb = case.solve(self.bind(backend, beam_width=beam, n_children=children))
        assert_never_worse_than(kb, babai_textbook, case)

    def test_multi_rhs_counterexample(self, backend):
        # Found by test_multi_rhs_equals_loop: RHS 1 has a one-point box at the first
        # level while RHS 0 does not; the numpy reference pads RHS 1's beam with copies
        # of its best path (bils/kbest.py, ``keep = np.where(np.isfinite(...), keep,
        # keep[:, :1])``), so its beam holds one distinct path instead of two.
        R = np.array([[1.42, -0.46, -0.92], [0.0, 1.28, 0.83], [0.0, 0.0, 0.3]])
        Y = np.array([[0.34, -2.14], [5.53, 1.63], [0.9, 0.51]])
        hi = np.full((3, 2), 3)
        hi[2, 1] = 0
        case = ProblemCase(R, Y, np.zeros((1, 1), np.int64), hi)
        contract.multi_rhs(self.bind(backend, beam_width=2), case)

    def test_tie_counterexample(self, backend):
        # Found by the test above: at an exact tie the "Babai child" kbest keeps is the
        # lower neighbour (stable sort by |c - z| lists z - 1 before z), not Babai's
        # floor(c + 1/2), so the true Babai path can be pruned.
        R = np.array([[1.0, -1.0, -0.5, -0.25], [0.0, 1.0, -0.75, -1.0],
                      [0.0, 0.0, -1.0, 1.0], [0.0, 0.0, 0.0, 0.5]])
        Y = np.array([[-3.375], [-1.40625], [0.375], [0.875]])
        s = np.array([[0.5], [1.0], [0.5], [2.0]])
        o = np.array([[-0.625], [0.875], [0.625], [0.75]])
        case = ProblemCase(R, Y, np.zeros((1, 1), np.int64), np.ones((1, 1), np.int64), s, o,
                           exact=True)
        kb = case.solve(self.bind(backend, beam_width=2, n_children=2))
        assert_never_worse_than(kb, babai_textbook, case)


class TestEnumerate(SolverContract):
    solver = staticmethod(bils.enumerate)
    variants = ({}, {"n_best": 3})

    # exact search: keep boxes brute-forceable (and the numpy reference quick)
    @given(case=small, v=variant_index)
    def test_feasible(self, backend, case, v):
        contract.feasible(self.bind(backend, v), case)

    @given(case=small, v=variant_index)
    def test_cost_consistent(self, backend, case, v):
        contract.cost_consistent(self.bind(backend, v), case)

    @given(case=small, v=variant_index)
    def test_never_worse_than_babai(self, backend, case, v):
        contract.never_worse_than_babai(self.bind(backend, v), case)

    @given(case=small_multi, v=variant_index)
    @settings(max_examples=100)
    def test_multi_rhs_equals_loop(self, backend, case, v):
        contract.multi_rhs(self.bind(backend, v), case)

    @given(example=small_shifted, v=variant_index)
    def test_translation_equivariant(self, backend, example, v):
        contract.translation_equivariant(self.bind(backend, v), example)

    @given(case=small)
    @settings(max_examples=100)
    def test_backend_agrees_with_numpy(self, backend, case):
        if backend == "numpy":
            pytest.skip("reference backend")
        fast = case.solve(self.bind(backend))
        assert_same_solution(fast, case.solve(self.bind("numpy")), case, compare="cost",
                             names=(backend, "numpy"))

    @given(case=small)
    def test_equals_brute_force(self, backend, case):
        res = case.solve(self.bind(backend))
        assert np.all(np.asarray(res.status) == Status.OPTIMAL)
        assert_optimal(res, case)

    @given(case=small)
    @settings(max_examples=100)
    def test_never_worse_than_any_heuristic(self, backend, case):
        res = case.solve(self.bind(backend))
        heuristics = {
            "babai": bils.babai,
            "klein": functools.partial(bils.klein, n_samples=8, rng=3),
            "kbest": functools.partial(bils.kbest, beam_width=4),
        }
        for name, fn in heuristics.items():
            other = case.solve(functools.partial(fn, backend="numpy"))
            assert_never_worse_than(res, other, case)

    @given(case=small, m=st.integers(1, 6))
    @settings(max_examples=100)
    def test_m_best_sorted_distinct_and_exact(self, backend, case, m):
        res = case.solve(self.bind(backend, n_best=m))
        bf = case.solve(functools.partial(brute_force, n_best=m))
        if m == 1:
            assert_optimal(res, case)
            return
        bx, bc = np.asarray(res.info["best_x"]), np.asarray(res.info["best_cost"])
        assert bx.shape == (m, case.n, case.k) and bc.shape == (m, case.k)
        ref = np.asarray(bf.info["best_cost"])
        for j in range(case.k):
            finite = np.isfinite(bc[:, j])
            n_pts = int(case.box_points[j])
            assert finite.sum() == min(m, n_pts), "wrong number of points in the m-best list"
            c = bc[finite, j]
            assert np.all(np.diff(c) >= 0), f"best_cost not sorted: {c}"
            pts = {tuple(p) for p in bx[finite, :, j]}
            assert len(pts) == len(c), "best_x has repeated points"
            col = case.column(j)
            for r in range(len(c)):  # each listed cost is the cost of its point
                rec = col.cost(bx[r, :, j])[0]
                assert abs(rec - c[r]) <= col.cost_tolerance(bx[r, :, j], 1e-9)[0]
            np.testing.assert_allclose(c, ref[finite, j], rtol=1e-9, atol=1e-9)
            np.testing.assert_array_equal(bx[0, :, j], np.asarray(res.x).reshape(case.n, -1)[:, j])

    @given(case=small, budget=st.integers(1, 40))
    @settings(max_examples=100)
    def test_budget_status_and_babai_floor(self, backend, case, budget):
        res = case.solve(self.bind(backend, max_nodes=budget))
        st_ = np.asarray(res.status).reshape(-1)
        assert set(st_.tolist()) <= {Status.OPTIMAL, Status.BUDGET_EXHAUSTED}
        # the Babai leaf is reached first, so even a truncated search is never worse
        assert_never_worse_than(res, case.solve(babai_textbook), case)
        full = case.solve(self.bind(backend))
        done = st_ == Status.OPTIMAL
        np.testing.assert_allclose(np.asarray(res.cost).reshape(-1)[done],
                                   np.asarray(full.cost).reshape(-1)[done], rtol=1e-9, atol=1e-12)
