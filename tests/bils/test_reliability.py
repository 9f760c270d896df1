"""Issue 17: every reproducer of a silent wrong result now raises a clear error or is correct.

One test per reproducer (1-9), each parametrised over the CPU backends where a solver is
involved, so the same input gives the same error type on numpy and numba.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import bils
from bils import BILSProblem
from bils._guard import bounds_iv, chunked, rhs_chunks
from bils.targets import JointStats, alpha_closed_form, joint_target

BACKENDS = ["numpy", pytest.param("numba", marks=pytest.mark.filterwarnings("ignore"))]
SOLVERS = {
    "babai": lambda *a, **k: bils.babai(*a, **k),
    "klein": lambda *a, **k: bils.klein(*a, rng=0, **k),
    "kbest": lambda *a, **k: bils.kbest(*a, beam_width=3, **k),
    "enumerate": lambda *a, **k: bils.enumerate(*a, **k),
}
WEIGHTS = r"level weights `R\[i, i\] \* scale\[i, j\]` must lie in"


def _ok(res, lo, hi):
    """A result is acceptable: finite costs, codes inside the box."""
    x = np.asarray(res.x)
    assert np.all(np.isfinite(res.cost))
    assert np.all((x >= lo) & (x <= hi))


# 1 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_r1_level_weight_underflow(solver, backend):
    # R_ii and s are each fine; their product underflows to 0
    with pytest.raises(ValueError, match=WEIGHTS):
        SOLVERS[solver](np.array([[1e-200]]), np.array([0.0]), 0, 3, scale=1e-200,
                        backend=backend)


# 2 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_r2_level_weight_overflow(solver, backend):
    with pytest.raises(ValueError, match=WEIGHTS):
        SOLVERS[solver](np.array([[1e200]]), np.array([1.0]), -2, 3, scale=1e200,
                        backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_r2_residual_bound_overflow(backend):
    # weights in range, but the targets and the box make costs overflow
    with pytest.raises(ValueError, match=r"overflow float64.*rescale the problem"):
        bils.babai(np.array([[1.0, 1e160], [0.0, 1.0]]), np.array([0.0, 1.0]), -2, 3,
                   backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_r2_near_limits_still_solved(backend):
    # large but safe magnitudes give finite, correct results
    R = np.array([[1e100, 1e99], [0.0, 1e-100]])
    res = bils.babai(R, R @ [1.0, 2.0], -4, 4, backend=backend)
    assert res.x.tolist() == [1, 2]
    _ok(res, -4, 4)


# 3 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("R, Y", [(1e30, 1.0), (1e-30, 1.0), (1.0, 1e30)])
def test_r3_float32_range(backend, R, Y):
    with pytest.raises(ValueError, match=r"float32"):
        bils.babai(np.array([[R]]), np.array([Y]), -2, 3, precision="float32", backend=backend)
    # the same problem in float64 is fine
    _ok(bils.babai(np.array([[R]]), np.array([Y]), -2, 3, backend=backend), -2, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_r3_float32_scale_underflows_alone(backend):
    # R_ii * s is fine in float64 but s itself is not a float32 normal number
    with pytest.raises(ValueError, match=r"`scale` has entries outside the float32 range"):
        bils.babai(np.array([[1e10]]), np.array([1.0]), -2, 3, scale=1e-39,
                   precision="float32", backend=backend)


# 4 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hi", [np.uint64(2**64 - 1), np.uint64(2**53), np.int64(2**62),
                                2**62, 1e300, np.float32(2**60)])
def test_r4_bounds_one_limit_for_every_dtype(backend, hi):
    with pytest.raises(ValueError, match=r"^`hi` must have magnitude <= 2\*\*52$"):
        bils.babai(np.eye(1), np.array([5.0]), 0, hi, backend=backend)
    with pytest.raises(ValueError, match=r"^`lo` must have magnitude <= 2\*\*52$"):
        bils.babai(np.eye(1), np.array([5.0]), -np.int64(2**62), 3, backend=backend)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64, np.int8,
                                   np.int32, np.int64, np.float32, np.float64])
def test_r4_bounds_cast_exact_at_limit(dtype):
    top = min(2**52, np.iinfo(dtype).max if np.dtype(dtype).kind in "iu" else 2**52)
    assert bounds_iv("hi", np.array([top], dtype=dtype)).tolist() == [top]
    assert bounds_iv("hi", np.array([top], dtype=dtype)).dtype == np.int64


@pytest.mark.parametrize("backend", BACKENDS)
def test_r4_wide_int_box_correct(backend):
    res = bils.babai(np.eye(2), np.array([5.0, -7.0]), -2**52, np.uint64(2**52),
                     backend=backend)
    assert res.x.tolist() == [5, -7] and float(res.cost) == 0.0


# 5 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("diag", [5e-324, 1e-310, 1e-160])
def test_r5_enumerate_subnormal_diagonal(backend, diag):
    R = np.array([[diag, 1.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match=WEIGHTS):
        bils.enumerate(R, np.array([0.0, 1.0]), 0, 3, backend=backend)


# 6 ------------------------------------------------------------------------------------------
def _problem():
    return BILSProblem.from_triangular(np.array([[2.0, 1.0], [0.0, 1.0]]), [[1.0], [2.0]], 0, 3)


@pytest.mark.parametrize("perm", [np.array([0, 0]), np.array([0, 2]), np.array([-1, 0]),
                                  np.array([0.0, 1.0]), np.array([[0], [0]])])
def test_r6_problem_perm_must_be_permutation(perm):
    with pytest.raises(ValueError, match=r"`perm` must be"):
        dataclasses.replace(_problem(), perm=perm)


@pytest.mark.parametrize("co", [np.nan, np.inf, -1.0, np.array([1.0, 2.0])])
def test_r6_problem_cost_offset(co):
    with pytest.raises(ValueError, match=r"`cost_offset` must be"):
        dataclasses.replace(_problem(), cost_offset=co)


@pytest.mark.parametrize("field, value, match", [
    ("R", np.ones((2, 3)), r"`R` must be a square"),
    ("Y", np.ones((3, 1)), r"`Y` must be a 2-D \(2, k\)"),
    ("Y", np.ones(2), r"`Y` must be a 2-D"),
    ("lo", np.zeros((3, 1)), r"`lo` must be a 2-D array of shape"),
    ("scale", np.ones(2), r"`scale` must be a 2-D array of shape"),
    ("dead", np.zeros(3, bool), r"`dead` must be None"),
    ("squeeze", "yes", r"`squeeze` must be a bool"),
])
def test_r6_problem_shapes(field, value, match):
    with pytest.raises((ValueError, TypeError), match=match):
        dataclasses.replace(_problem(), **{field: value})


@pytest.mark.parametrize("backend", BACKENDS)
def test_r6_valid_problem_still_solves_with_perm(backend):
    p = dataclasses.replace(_problem(), perm=np.array([1, 0]), cost_offset=0.5)
    res = bils.babai(p, backend=backend)
    assert np.allclose(res.cost, p.cost(res.x))


# 7 ------------------------------------------------------------------------------------------
W = np.array([[1.0, 2.0]])
D = np.array([[0.0, 0.0], [1.0, 0.0]])


@pytest.mark.parametrize("fn", [lambda H: joint_target(W, H, D, 0.5),
                                lambda H: alpha_closed_form(W + 0.5, W, H, D)])
def test_r7_targets_reject_nonsymmetric_and_nan(fn):
    with pytest.raises(ValueError, match=r"^`H` must be symmetric$"):
        fn(np.array([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"^`H` must be finite$"):
        fn(np.array([[np.nan, 0.0], [0.0, 1.0]]))


def test_r7_alpha_closed_form_clipped_or_error():
    H = np.eye(2)
    with pytest.raises(ValueError, match=r"^`Q` must be finite$"):
        alpha_closed_form(np.array([[np.nan, 2.0]]), W, H, D)
    with pytest.raises(ValueError, match=r"overflowed"):
        alpha_closed_form(W, W * 1e200, H, D * 1e200)
    rng = np.random.default_rng(0)
    for _ in range(50):
        Q = W + rng.standard_normal(W.shape) * 10
        a = alpha_closed_form(Q, W, H, D)
        assert 0.0 <= a <= 1.0


def test_r7_joint_target_alpha_range_and_overflow():
    with pytest.raises(ValueError, match=r"`alpha` must be in \[0, 1\]"):
        joint_target(W, np.eye(2), D, 1.5)
    with pytest.raises(ValueError, match=r"overflowed"):
        joint_target(W * 1e300, np.eye(2) * 1e-300, D * 1e10, 1.0)


def test_r7_joint_stats_rejects_nonfinite_and_keeps_state():
    st = JointStats(2)
    X = np.ones((2, 3))
    st.add(X, X * 0.5)
    H0, D0 = st.H.copy(), st.D.copy()
    for bad in (np.nan, np.inf):
        Xb = X.copy()
        Xb[0, 1] = bad
        with pytest.raises(ValueError, match=r"^`X` must be finite"):
            st.add(Xb, X)
        with pytest.raises(ValueError, match=r"^`Xq` must be finite"):
            st.add(X, Xb)
    with pytest.raises(ValueError, match=r"overflow"):
        st.add(X * 1e200, X * 1e200)
    assert np.array_equal(st.H, H0) and np.array_equal(st.D, D0) and st.n_samples == 3


@pytest.mark.parametrize("G, match", [
    (np.array([[2.0, 1.0], [0.0, 2.0]]), r"^`G` must be symmetric$"),
    (np.array([[1.0, 2.0], [2.0, 1.0]]), r"^`G` must be positive definite"),
    (np.array([[1.0, 0.0], [0.0, -1.0]]), r"^`G` must be positive definite"),
    (np.eye(2) * (1 + 1j), r"`G` must hold real numbers"),
])
@pytest.mark.parametrize("method", ["natural", "diag", "sqrd", "vblast"])
def test_r7_column_order_rejects(G, match, method):
    with pytest.raises((ValueError, TypeError), match=match):
        bils.column_order(G, method)


# 8 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_r8_kbest_huge_beam_refused_up_front(backend):
    with pytest.raises(ValueError, match=r"`kbest` with `beam_width`=100000.*GiB of memory"):
        bils.kbest(np.eye(4), np.zeros(4), -2**20, 2**20, beam_width=10**5, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_r8_enumerate_n_best_refused(backend):
    with pytest.raises(ValueError, match=r"`enumerate` with `n_best`=.*lower `n_best`"):
        bils.enumerate(np.eye(4), np.zeros(4), -2, 2, n_best=10**12, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_r8_klein_window_and_samples_refused(backend):
    with pytest.raises(ValueError, match=r"`klein`.*GiB of memory"):
        bils.klein(np.eye(4), np.zeros(4), -2**50, 2**50, tau=1e30, backend=backend)
    with pytest.raises(ValueError, match=r"`klein`.*operations per right-hand side"):
        bils.klein(np.eye(4), np.zeros(4), -2, 2, n_samples=10**12, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_r8_huge_max_nodes_means_unlimited(backend):
    res = bils.enumerate(np.eye(3), np.array([0.4, 1.6, -0.7]), -2, 2, max_nodes=2**70,
                         backend=backend)
    assert res.x.tolist() == [0, 2, -1] and res.all_optimal


def test_r8_chunked_equals_one_call_and_is_interruptible():
    rng = np.random.default_rng(1)
    R = np.triu(rng.standard_normal((5, 5))) + 3 * np.eye(5)
    Y = rng.standard_normal((5, 37)) * 3
    one = bils.enumerate(R, Y, -3, 3, n_best=2, backend="numpy")
    from bils._validate import problem_iv
    from bils.enumeration import _enumerate_numpy

    can = problem_iv(R, Y, -3, 3)
    calls = []

    def kernel(c, **o):
        calls.append(c.k)
        if len(calls) == 3:
            raise KeyboardInterrupt  # stands in for Ctrl-C arriving between chunks
        return _enumerate_numpy(c, **o)

    with pytest.raises(KeyboardInterrupt):
        chunked(kernel, lambda c, **o: 1e7, target=1e8, min_width=1)(can, max_nodes=-1, n_best=2)
    assert calls == [10, 10, 10]  # stopped at the third chunk, nothing after
    x, cost, status, info = chunked(_enumerate_numpy, lambda c, **o: 1e7, target=1e8,
                                    min_width=1)(can, max_nodes=-1, n_best=2)
    assert np.array_equal(x, one.x) and np.array_equal(cost, one.cost)
    assert np.array_equal(info["best_x"], one.info["best_x"])
    assert [s.stop - s.start for s in rhs_chunks(37, 1e7, 1e8, min_width=1)] == [10, 10, 10, 7]
    assert [s.stop - s.start for s in rhs_chunks(600, 1e9)] == [256, 256, 88]  # wide products


# 9 ------------------------------------------------------------------------------------------
BAD_INPUTS = {
    "weights underflow": ((np.array([[1e-200]]), np.array([0.0]), 0, 3), {"scale": 1e-200}),
    "weights overflow": ((np.array([[1e200]]), np.array([1.0]), -2, 3), {"scale": 1e200}),
    "subnormal diagonal": ((np.array([[5e-324]]), np.array([0.0]), 0, 3), {}),
    "uint64 bound": ((np.eye(1), np.array([5.0]), 0, np.uint64(2**64 - 1)), {}),
    "int64 bound": ((np.eye(1), np.array([5.0]), -2**62, 2**62), {}),
    "nan Y": ((np.eye(1), np.array([np.nan]), 0, 3), {}),
    "zero scale": ((np.eye(1), np.array([1.0]), 0, 3), {"scale": 0.0}),
    "residual overflow": ((np.array([[1.0, 1e160], [0.0, 1.0]]), np.zeros(2), -2, 3), {}),
}


@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_r9_same_error_type_on_every_backend(solver, case):
    args, kw = BAD_INPUTS[case]
    errors = []
    for backend in ("numpy", "numba"):
        with pytest.raises(Exception) as info:
            SOLVERS[solver](*args, backend=backend, **kw)
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]
    assert errors[0][0] is ValueError


def test_r8_numba_enumerate_in_slices_equals_one_run(monkeypatch):
    pytest.importorskip("numba")
    import bils._numba.enumerate as E

    rng = np.random.default_rng(3)
    R = np.triu(rng.standard_normal((7, 7))) + 2 * np.eye(7)
    Y = rng.standard_normal((7, 9)) * 5
    ref = bils.enumerate(R, Y, -6, 6, n_best=3, backend="numpy")
    budget = bils.enumerate(R, Y, -6, 6, max_nodes=11, backend="numpy")
    monkeypatch.setattr(E, "SLICE_NODES", 5)
    monkeypatch.setattr(E, "MIN_SLICE", 1)
    monkeypatch.setattr(E, "CHUNK_RHS", 4)
    got = bils.enumerate(R, Y, -6, 6, n_best=3, backend="numba")
    for key in ("nodes", "best_x", "best_cost"):
        assert np.array_equal(got.info[key], ref.info[key])
    assert np.array_equal(got.x, ref.x) and np.array_equal(got.status, ref.status)
    got = bils.enumerate(R, Y, -6, 6, max_nodes=11, backend="numba")
    assert np.array_equal(got.x, budget.x) and np.array_equal(got.status, budget.status)
    assert np.array_equal(got.info["nodes"], budget.info["nodes"])


def test_r8_numba_enumerate_honours_ctrl_c():
    pytest.importorskip("numba")
    import os
    import signal
    import threading
    import time

    bils.enumerate(np.eye(2), np.zeros(2), -1, 1, backend="numba")  # compiled before the clock
    rng = np.random.default_rng(0)
    n = 40
    R = np.triu(rng.standard_normal((n, n))) * 10
    R[np.diag_indices(n)] = np.abs(R[np.diag_indices(n)]) + 0.1
    y = rng.standard_normal(n) * 100  # an exponentially long exact search
    timer = threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT))
    t0 = time.perf_counter()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            bils.enumerate(R, y, -1000, 1000, backend="numba")
    finally:
        timer.cancel()  # never let a late SIGINT reach the test session
        timer.join()
    assert time.perf_counter() - t0 < 10.0


def test_level_weights_mixed_sign_scale():
    from bils._guard import _abs_range

    S = np.array([[2.0, -3.0, 0.5], [-1.0, -4.0, -0.25], [1e-3, 5.0, 7.0]])
    amin, amax = _abs_range(S, axis=1)
    assert amin.tolist() == [0.5, 0.25, 1e-3] and amax.tolist() == [3.0, 4.0, 7.0]
    amin, amax = _abs_range(S, axis=0)
    assert amin.tolist() == [1e-3, 3.0, 0.25] and amax.tolist() == [2.0, 5.0, 7.0]
    # a negative scale whose weight underflows is caught like a positive one
    with pytest.raises(ValueError, match=WEIGHTS):
        bils.babai(np.eye(2), np.zeros((2, 3)), -1, 1, scale=np.array([[1.0, -1e-200, 1.0]]),
                   backend="numpy")
