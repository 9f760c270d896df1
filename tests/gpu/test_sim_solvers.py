"""``backend="cupy"`` against the numba backend, kernel by kernel (marker ``kernel``).

Runs under numba-cuda's CUDA simulator (``make gpu-sim``: numpy arrays stand in for CuPy
arrays and the kernels run in Python) or on a CUDA device (``make gpu-check``). Launch
sizes are shrunk (:data:`bils._cuda._common.LAUNCH`) so that small problems cross CUDA
block, Babai block and K-best panel edges. Problems stay small: the simulator runs one
Python thread per CUDA thread.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import bils
from bils.testing import (assert_cost_consistent, assert_feasible, assert_never_worse_than,
                          assert_optimal, assert_same_solution)

pytestmark = [pytest.mark.kernel,
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]


def host(a):
    """A device array (CuPy) or numpy array as numpy."""
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def H(res):
    """The result's ``x``/``cost``/``status``/``info`` arrays on the host."""
    info = {k: host(v) if hasattr(v, "shape") else v for k, v in res.info.items()}
    return types.SimpleNamespace(x=host(res.x), cost=host(res.cost), status=host(res.status),
                                 info=info, backend=res.backend)


@pytest.fixture(autouse=True, params=[(8, 4, 2, 3), (16, 5, 3, 4)], ids=["t8-l4-s2", "t16-l5-s3"])
def small_launch(request):
    """Shrunk launch sizes: (threads per block, levels per block, levels per shared-memory
    sub-block, K-best panel levels)."""
    from bils._cuda._common import LAUNCH

    saved = (LAUNCH.threads, LAUNCH.levels, LAUNCH.sub_levels, LAUNCH.kbest_levels)
    LAUNCH.threads, LAUNCH.levels, LAUNCH.sub_levels, LAUNCH.kbest_levels = request.param
    yield request.param
    LAUNCH.threads, LAUNCH.levels, LAUNCH.sub_levels, LAUNCH.kbest_levels = saved


def call(fn, case, **kw):
    """``fn(R, Y, lo, hi, scale=..., offset=..., **kw)`` for a case tuple."""
    R, Y, lo, hi, scale, offset = case
    return fn(R, Y, lo, hi, scale=scale, offset=offset, **kw)


def _problem(n, k, seed, *, grid="rhs", cond=2.0, spread=5.0):
    rng = np.random.default_rng(seed)
    R = np.triu(rng.standard_normal((n, n))) + cond * np.eye(n)
    Y = rng.standard_normal((n, k)) * spread
    if grid == "rhs":
        scale, offset = rng.uniform(0.5, 2.0, (1, k)), rng.uniform(-0.5, 0.5, (1, k))
    elif grid == "coordinate":
        scale, offset = rng.uniform(0.5, 2.0, (n, 1)), 0.25
    else:  # dense (n, k) grids, as materialised grouped grids
        scale, offset = rng.uniform(0.5, 2.0, (n, k)), rng.uniform(-0.5, 0.5, (n, k))
    return R, Y, scale, offset


@pytest.mark.parametrize("n, k, grid", [(11, 37, "rhs"), (12, 70, "coordinate"), (7, 9, "full")])
def test_babai_float64_matches_numba(n, k, grid):
    R, Y, scale, offset = _problem(n, k, n * k, grid=grid)
    case = (R, Y, -4, 4, scale, offset)
    gpu = bils.babai(R, Y, -4, 4, scale=scale, offset=offset, backend="cupy")
    cpu = bils.babai(R, Y, -4, 4, scale=scale, offset=offset, backend="numba")
    assert gpu.backend == "cupy"
    g = H(gpu)
    assert g.x.dtype == np.int64 and g.status.dtype == np.int8
    assert_same_solution(g, cpu, case, names=("cupy", "numba"))
    assert np.array_equal(g.status, cpu.status)
    assert_feasible(g, case)
    assert_cost_consistent(g, case)


@pytest.mark.parametrize("solver, kw", [("babai", {}), ("klein", {"n_samples": 3, "rng": 4}),
                                        ("kbest", {"beam_width": 4})])
def test_grouped_and_full_grids_same_codes_on_every_backend(solver, kw):
    """Issue #23: a :class:`bils.GroupedGrid` (groups of 4 rows x RHS, 3 bits) and the
    (n, k) arrays it stands for give identical codes on numpy, numba and cupy (float64);
    costs agree to rounding."""
    rng = np.random.default_rng(23)
    n, k, g = 12, 19, 4
    R = np.triu(rng.standard_normal((n, n))) * 0.3 + 2 * np.eye(n)
    Y = rng.standard_normal((n, k)) * 6
    groups = np.arange(n) // g
    S = bils.GroupedGrid(rng.uniform(0.5, 2.0, (n // g, k)), groups)
    O = bils.GroupedGrid(rng.uniform(-0.5, 0.5, (n // g, k)), groups)
    fn = getattr(bils, solver)
    results = {}
    for form, (scale, offset) in {"grouped": (S, O), "full": (S.dense(), O.dense())}.items():
        for backend in ("numpy", "numba", "cupy"):
            results[form, backend] = H(fn(R, Y, 0, 7, scale=scale, offset=offset, backend=backend, **kw))
    ref = results["full", "numpy"]
    for key, r in results.items():
        assert np.array_equal(r.x, ref.x), key
        np.testing.assert_allclose(r.cost, ref.cost, rtol=1e-10, err_msg=str(key))
    assert_feasible(ref, (R, Y, 0, 7, S.dense(), O.dense()))


def test_babai_default_launch_sizes(monkeypatch):
    """The shipped sizes: 128-level blocks (float64: two 64-level shared-memory sub-blocks)."""
    from bils._cuda._common import LAUNCH, Launch

    monkeypatch.setattr(LAUNCH, "levels", Launch.levels)
    monkeypatch.setattr(LAUNCH, "sub_levels", Launch.sub_levels)
    rng = np.random.default_rng(9)
    n, k = 140, 3
    R = np.triu(rng.standard_normal((n, n))) * 0.1 + 2 * np.eye(n)
    Y = rng.standard_normal((n, k)) * 5
    for precision in ("float64", "float32"):
        g = H(bils.babai(R, Y, -4, 4, precision=precision, backend="cupy"))
        c = bils.babai(R, Y, -4, 4, precision=precision, backend="numba")
        assert np.array_equal(g.x, c.x)
        np.testing.assert_allclose(g.cost, c.cost, rtol=1e-5 if precision == "float32" else 1e-12)


def test_babai_float32_matches_numba():
    R, Y, scale, offset = _problem(12, 70, 3)
    g = H(bils.babai(R, Y, -8, 7, scale=scale, offset=offset, precision="float32",
                     backend="cupy"))
    c = bils.babai(R, Y, -8, 7, scale=scale, offset=offset, precision="float32", backend="numba")
    assert np.mean(g.x == c.x) >= 0.999
    np.testing.assert_allclose(g.cost, c.cost, rtol=1e-4, atol=1e-4)


def test_babai_one_rhs_and_problem_orderings():
    R, Y, scale, offset = _problem(9, 5, 11)
    g = H(bils.babai(R, Y[:, 0], -3, 3, backend="cupy"))
    c = bils.babai(R, Y[:, 0], -3, 3, backend="numba")
    assert g.x.shape == (9,) and np.ndim(g.cost) == 0
    assert np.array_equal(g.x, c.x) and np.isclose(g.cost, c.cost)
    A = np.random.default_rng(2).standard_normal((14, 9))
    for ordering in ("diag", "chang_han"):  # one permutation; one per RHS
        prob = bils.BILSProblem.from_design(A, A @ Y, -3, 3, ordering=ordering)
        g = H(bils.babai(prob, backend="cupy"))
        c = bils.babai(prob, backend="numba")
        assert np.array_equal(g.x, c.x)
        np.testing.assert_allclose(g.cost, c.cost, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("K, C, lo, hi", [(4, None, -4, 4), (3, 2, -4, 4), (5, None, 0, 1),
                                          (1, None, -3, 3)])
def test_kbest_matches_numba(K, C, lo, hi):
    R, Y, scale, offset = _problem(10, 21, K, cond=1.0)
    case = (R, Y, lo, hi, scale, offset)
    g = H(call(bils.kbest, case, beam_width=K, n_children=C, backend="cupy"))
    c = call(bils.kbest, case, beam_width=K, n_children=C, backend="numba")
    assert_same_solution(g, c, case, names=("cupy", "numba"))
    b = call(bils.babai, case, backend="numba")
    assert_never_worse_than(g, b, case)


@pytest.mark.parametrize("max_nodes, n_best", [(None, 1), (20, 1), (None, 3)])
def test_enumerate_matches_numba(max_nodes, n_best):
    R, Y, scale, offset = _problem(8, 21, 5, grid="rhs")
    case = (R, Y, -4, 4, scale, offset)
    g = H(call(bils.enumerate, case, max_nodes=max_nodes, n_best=n_best, backend="cupy"))
    c = call(bils.enumerate, case, max_nodes=max_nodes, n_best=n_best, backend="numba")
    assert_same_solution(g, c, case, names=("cupy", "numba"))
    assert np.array_equal(g.status, c.status)
    assert np.array_equal(g.info["nodes"], c.info["nodes"])
    if n_best > 1:
        assert np.array_equal(g.info["best_x"], c.info["best_x"])
        np.testing.assert_allclose(g.info["best_cost"], c.info["best_cost"], rtol=1e-12)
    if max_nodes is None:
        assert_optimal(g, case)


@pytest.mark.parametrize("n_samples, tau", [(4, "auto"), (2, 0.5), (0, "auto")])
def test_klein_seeded_matches_cpu(n_samples, tau):
    R, Y, scale, offset = _problem(10, 13, 7, cond=0.5)
    case = (R, Y, -6, 6, scale, offset)
    g = H(call(bils.klein, case, n_samples=n_samples, tau=tau, rng=5, backend="cupy"))
    c = call(bils.klein, case, n_samples=n_samples, tau=tau, rng=5, backend="numba")
    assert_same_solution(g, c, case, names=("cupy", "numba"))
    assert np.array_equal(g.info["improved"], c.info["improved"])
    assert_never_worse_than(g, call(bils.babai, case, backend="numba"), case)
    if n_samples == 4:
        assert c.info["improved"].any()  # the comparison covers sampled winners


def test_klein_sample_groups(monkeypatch):
    """Samples drawn in several sweeps (groups of 3 + 1) give the single sweep's answer."""
    from bils._cuda import klein as cuda_klein

    R, Y, scale, offset = _problem(10, 13, 7, cond=0.5)
    case = (R, Y, -6, 6, scale, offset)
    one = H(call(bils.klein, case, n_samples=4, rng=5, backend="cupy"))
    monkeypatch.setattr(cuda_klein, "SAMPLE_BYTES", 16 * 10 * 13 * 3)
    grouped = H(call(bils.klein, case, n_samples=4, rng=5, backend="cupy"))
    assert np.array_equal(one.x, grouped.x) and np.array_equal(one.cost, grouped.cost)
    assert np.array_equal(one.info["improved"], grouped.info["improved"])


@pytest.mark.parametrize("method", ["round_off", "nearest_plane", "kbest", "exact"])
@pytest.mark.parametrize("companded", [False, True])
def test_lattice_encoders_match_cpu(method, companded):
    rng = np.random.default_rng(3)
    d = 4
    G = np.triu(rng.standard_normal((d, d))) * 0.3 + np.eye(d)
    cb = bils.Codebook(G, bits=2, **({"mu": 20.0, "amax": 2.0} if companded else {}))
    V = rng.standard_normal((2 * d, 11))
    A = rng.standard_normal((2 * d, 2 * d))
    M = A @ A.T + np.eye(2 * d)
    g = bils.lattice.encode(cb, V, M, method=method, beam_width=3, backend="cupy")
    c = bils.lattice.encode(cb, V, M, method=method, beam_width=3, backend="numba")
    assert g.backend == "cupy" and g.solver == c.solver
    gx = H(g)
    assert np.array_equal(gx.x, c.x)
    np.testing.assert_allclose(gx.cost, c.cost, rtol=1e-9, atol=1e-12)
    assert np.array_equal(gx.status, c.status)
    one = bils.lattice.encode(cb, V[:d, 0], method=method, backend="cupy")
    ref = bils.lattice.encode(cb, V[:d, 0], method=method, backend="numba")
    assert np.array_equal(host(one.x), ref.x) and host(one.status) == ref.status


def test_fit_generator_on_cupy_matches_cpu():
    rng = np.random.default_rng(4)
    V = rng.standard_normal((4, 30))
    g = bils.fit_generator(V, 2, d=2, n_iter=2, backend="cupy")
    c = bils.fit_generator(V, 2, d=2, n_iter=2, backend="numba")
    assert np.array_equal(g.x, c.x) and isinstance(g.x, np.ndarray)
    np.testing.assert_allclose(g.codebook.G, c.codebook.G, rtol=1e-9, atol=1e-12)


BAD = [
    ((np.ones((3, 2)), np.ones(3), 0, 1), {}),  # R not square
    ((np.tril(np.ones((3, 3))), np.ones(3), 0, 1), {}),  # R not upper triangular
    ((np.eye(3), np.ones(4), 0, 1), {}),  # Y rows
    ((np.eye(3), np.ones(3), 1, 0), {}),  # lo > hi
    ((np.eye(3), np.ones(3), 0.5, 1), {}),  # lo not integer
    ((np.eye(3), np.array([1.0, np.nan, 0.0]), 0, 1), {}),  # Y not finite
    ((np.eye(3), np.ones(3), 0, 1), {"scale": 0.0}),  # scale zero
    ((np.eye(3), np.ones((3, 2)), 0, 1), {"offset": np.ones((2, 2))}),  # offset shape
]


@pytest.mark.parametrize("solver", ["babai", "klein", "kbest", "enumerate"])
@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_input_same_errors(solver, i):
    args, kw = BAD[i]
    fn = getattr(bils, solver)
    with pytest.raises((ValueError, TypeError)) as cpu:
        fn(*args, **kw, backend="numba")
    with pytest.raises(type(cpu.value), match=None) as gpu:
        fn(*args, **kw, backend="cupy")
    assert str(gpu.value) == str(cpu.value)


def test_gpu_limits_and_auto():
    R, Y, _, _ = _problem(4, 3, 1)
    with pytest.raises(ValueError, match="beam_width"):
        bils.kbest(R, Y, -1, 1, beam_width=17, backend="cupy")
    big = np.eye(65)
    with pytest.raises(ValueError, match="at most 64 levels"):
        bils.enumerate(big, np.zeros(65), -1, 1, backend="cupy")
    # numpy inputs never pick the GPU, even under the simulator
    assert bils.resolve_backend("auto", R, Y) in ("numba", "numpy")
    assert bils.babai(R, Y, -1, 1).backend in ("numba", "numpy")


def _hyp_problems():
    from bils.testing.strategies import bils_problems

    return bils_problems(max_n=6, max_k=3)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=_hyp_problems())
def test_property_cupy_equals_numba(case):
    """Random problems incl. exact ties: same codes (ties: bit-exact dyadic data)."""
    compare = "x" if case.exact else "cost"
    args = (case.R, case.Y, case.lo, case.hi)
    kw = {"scale": case.scale, "offset": case.offset}
    for solver, opts in (("babai", {}), ("kbest", {"beam_width": 3}), ("enumerate", {})):
        fn = getattr(bils, solver)
        g = H(fn(*args, **kw, **opts, backend="cupy"))
        c = fn(*args, **kw, **opts, backend="numba")
        assert_same_solution(g, c, case, compare=compare, names=("cupy", "numba"))
