"""Dask right-hand sides: lazy results equal the in-memory solve on any scheduler.

The cluster tests run a 2-process ``LocalCluster`` on loopback (module-scoped, every
wait bounded by a timeout). Oracle: the same solver called on the numpy arrays. Codes
and statuses must be identical; costs are identical with the numba backend and equal to
rounding with the numpy reference (numpy's vector products round differently for
different column counts).
"""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bils

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")
distributed = pytest.importorskip("distributed")
from dask.delayed import Delayed  # noqa: E402  (after the importorskip)

TIMEOUT = 120  # seconds: every wait on the cluster is bounded

SOLVERS = {
    "babai": (bils.babai, {"block_size": 4}),
    "klein": (bils.klein, {"n_samples": 5, "rng": 11}),
    "kbest": (bils.kbest, {"beam_width": 4}),
    "enumerate": (bils.enumerate, {"max_nodes": 500, "n_best": 2}),
}
CHUNKINGS = (1, 7, 16, 40)  # columns per chunk; k = 40


def _case(seed=0, n=9, k=40):
    rng = np.random.default_rng(seed)
    R = np.triu(rng.standard_normal((n, n))) + 2.5 * np.eye(n)
    Y = rng.standard_normal((n, k)) * 6
    S = rng.uniform(0.5, 1.5, (n, k))
    O = rng.standard_normal((1, k))
    lo = rng.integers(-4, -1, (n, 1))
    hi = rng.integers(1, 4, (n, k))
    return R, Y, lo, hi, S, O


def _same(ref, res, *, exact_cost):
    np.testing.assert_array_equal(res.x, ref.x)
    np.testing.assert_array_equal(res.status, ref.status)
    if exact_cost:
        np.testing.assert_array_equal(res.cost, ref.cost)
    else:
        np.testing.assert_allclose(res.cost, ref.cost, rtol=1e-12, atol=1e-12)
    for key, v in ref.info.items():
        if key in res.info and isinstance(v, np.ndarray) and key != "chunks":
            np.testing.assert_allclose(res.info[key], v, rtol=1e-12, err_msg=key)


def _lazy(solver, R, Y, lo, hi, S, O, cols, **kw):
    # Y chunked along both axes (rows are rechunked to one), the per-RHS grid as dask too
    return solver(R, da.from_array(Y, chunks=(4, cols)), lo, hi,
                  scale=da.from_array(S, chunks=(Y.shape[0], max(1, cols // 2 + 3))), offset=O, **kw)


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(processes=True, n_workers=2, threads_per_worker=1,
                                       dashboard_address=None, host="127.0.0.1",
                                       worker_class=distributed.Nanny, timeout=TIMEOUT)
    c = distributed.Client(cluster, timeout=TIMEOUT)
    try:
        c.wait_for_workers(2, timeout=TIMEOUT)
        yield c
    finally:
        c.close(timeout=TIMEOUT)
        cluster.close(timeout=TIMEOUT)


def _compute(client, res):
    fut = client.compute([res.x, res.cost, res.status,
                          {k: v for k, v in res.info.items() if bils.result._is_dask(v)}])
    x, cost, status, info = [f.result(timeout=TIMEOUT) for f in fut]
    return bils.BILSResult(x=x, cost=cost, status=status, backend=res.backend, solver=res.solver,
                           info=dict(res.info, **info))


# ---------------------------------------------------------------------- no cluster
def test_importing_bils_does_not_import_dask():
    code = "import sys, bils; bils.babai([[1.0]], [0.4], 0, 1, backend='numpy'); print('dask' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("cols", CHUNKINGS)
def test_threaded_scheduler_equals_in_memory(name, cols):
    solver, kw = SOLVERS[name]
    R, Y, lo, hi, S, O = _case()
    ref = solver(R, Y, lo, hi, scale=S, offset=O, backend="numpy", **kw)
    lazy = _lazy(solver, R, Y, lo, hi, S, O, cols, backend="numpy", **kw)
    assert lazy.is_lazy and isinstance(lazy.x, da.Array) and lazy.x.chunks[1] == da.from_array(
        Y, chunks=(4, cols)).chunks[1]
    _same(ref, lazy.compute(scheduler="threads"), exact_cost=False)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_numba_chunks_bit_identical(name):
    solver, kw = SOLVERS[name]
    R, Y, lo, hi, S, O = _case(1)
    ref = solver(R, Y, lo, hi, scale=S, offset=O, backend="numba", **kw)
    for cols in (3, 40):
        lazy = _lazy(solver, R, Y, lo, hi, S, O, cols, backend="numba", **kw)
        # enumerate's wrapper forms Y - R @ offset with a numpy product over all columns
        _same(ref, lazy.compute(scheduler="threads"), exact_cost=name != "enumerate")


@st.composite
def _chunked_cases(draw):
    n = draw(st.integers(1, 6))
    k = draw(st.integers(1, 25))
    cuts = sorted(draw(st.sets(st.integers(1, k - 1), max_size=6))) if k > 1 else []
    chunks = tuple(b - a for a, b in zip([0] + cuts, cuts + [k]))
    return n, k, chunks, draw(st.integers(0, 2**32 - 1)), draw(st.sampled_from(sorted(SOLVERS)))


@given(case=_chunked_cases())
@settings(max_examples=40, deadline=None)
def test_any_chunking_equals_in_memory(case):
    n, k, chunks, seed, name = case
    solver, kw = SOLVERS[name]
    rng = np.random.default_rng(seed)
    R = np.triu(rng.standard_normal((n, n))) + 2.0 * np.eye(n)
    Y = rng.standard_normal((n, k)) * 5
    S = rng.uniform(0.5, 1.5, (1, k))
    ref = solver(R, Y, -3, 3, scale=S, backend="numpy", **kw)
    lazy = solver(R, da.from_array(Y, chunks=((n,), chunks)), -3, 3, scale=S, backend="numpy", **kw)
    assert lazy.x.chunks[1] == chunks
    _same(ref, lazy.compute(scheduler="sync"), exact_cost=False)
    # reduce_chunks hands every chunk's fields, in column order, to the aggregation
    x, cost = lazy.reduce_chunks(lambda x, c, s: (x, c), aggregate=lambda parts: tuple(
        np.concatenate(f, axis=-1) for f in zip(*parts))).compute(scheduler="sync")
    np.testing.assert_array_equal(x, ref.x)
    np.testing.assert_allclose(cost, ref.cost, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_multiprocessing_scheduler_equals_in_memory():
    R, Y, lo, hi, S, O = _case(13)
    for name in ("babai", "klein"):
        solver, kw = SOLVERS[name]
        ref = solver(R, Y, lo, hi, scale=S, offset=O, backend="numpy", **kw)
        lazy = _lazy(solver, R, Y, lo, hi, S, O, 10, backend="numpy", **kw)
        _same(ref, lazy.compute(scheduler="processes", num_workers=2), exact_cost=False)


def test_klein_seeds_follow_the_global_column_and_the_generator():
    R, Y, lo, hi, S, O = _case(2)
    gen_a, gen_b = np.random.default_rng(5), np.random.default_rng(5)
    ref = bils.klein(R, Y, lo, hi, scale=S, offset=O, n_samples=6, rng=gen_a, backend="numpy")
    lazy = bils.klein(R, da.from_array(Y, chunks=(9, 6)), lo, hi, scale=S, offset=O,
                      n_samples=6, rng=gen_b, backend="numpy")
    # the seeds are drawn when the graph is built: both generators advanced alike
    assert gen_a.integers(1 << 30) == gen_b.integers(1 << 30)
    got = lazy.compute(scheduler="threads")
    np.testing.assert_array_equal(got.x, ref.x)
    np.testing.assert_array_equal(got.info["improved"], ref.info["improved"])
    assert ref.info["improved"].any()  # the samples matter in this case
    # computing twice (or elsewhere) gives the same codes
    np.testing.assert_array_equal(lazy.compute(scheduler="sync").x, got.x)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_wide_chunks_are_solved_in_slices_with_the_same_result(name, monkeypatch):
    """A chunk wider than SOLVE_SLICE_ELEMENTS // n columns is solved slice by slice (a
    kernel call per slice, each with its global columns): the same codes, statuses, costs
    (numba: bit for bit) and per-RHS info as one in-memory call, with per-RHS bounds,
    scales and offsets, and Klein's seeds."""
    import bils._dask as bd

    solver, kw = SOLVERS[name]
    R, Y, lo, hi, S, O = _case(23)
    ref = solver(R, Y, lo, hi, scale=S, offset=O, backend="numba", **kw)
    calls = []
    real = bd._solve_block_here

    def counted(R_, Y_, *args, **kwargs):
        calls.append((kwargs["j0"], Y_.shape[1]))
        return real(R_, Y_, *args, **kwargs)

    monkeypatch.setattr(bd, "_solve_block_here", counted)
    monkeypatch.setattr(bd, "SOLVE_SLICE_ELEMENTS", 9 * 6)  # n = 9: slices of 6 columns
    lazy = solver(R, da.from_array(Y, chunks=(9, (25, 15))), lo, hi, scale=da.from_array(S, chunks=(9, 20)),
                  offset=O, backend="numba", **kw)
    got = lazy.compute(scheduler="sync")
    assert sorted(calls) == [(0, 6), (6, 6), (12, 6), (18, 6), (24, 1), (25, 6), (31, 6), (37, 3)]
    _same(ref, got, exact_cost=name != "enumerate")  # enumerate: see test_numba_chunks_bit_identical
    for key in ("best_x", "best_cost", "nodes", "tau", "improved"):
        if key in ref.info:
            np.testing.assert_array_equal(got.info[key], ref.info[key], err_msg=key)
    # and through reduce_chunks, the path that solves inside the reduction's tasks
    calls.clear()
    total = lazy.reduce_chunks(lambda x, c, s: c.sum()).compute(scheduler="sync")
    assert len(calls) == 8 and np.isclose(total, ref.cost.sum(), rtol=1e-12)


def test_wide_problem_chunks_keep_the_cost_offset(monkeypatch):
    """A BILSProblem chunk (per-RHS constant cost, a shared ordering) solved in slices."""
    import bils._dask as bd

    monkeypatch.setattr(bd, "SOLVE_SLICE_ELEMENTS", 6 * 4)  # n = 6: slices of 4 columns
    rng = np.random.default_rng(6)
    A = rng.standard_normal((20, 6))
    B = rng.standard_normal((20, 25)) * 4
    ref = bils.BILSProblem.from_design(A, B, -5, 5, ordering="sqrd")
    lazy = bils.BILSProblem.from_design(A, da.from_array(B, chunks=(20, 13)), -5, 5, ordering="sqrd")
    for solver in (bils.babai, bils.kbest):
        a, b = solver(ref, backend="numba"), solver(lazy, backend="numba").compute(scheduler="sync")
        np.testing.assert_array_equal(b.x, a.x)
        np.testing.assert_allclose(b.cost, a.cost, rtol=1e-12)  # includes the cost offset


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_grouped_grids_with_dask_targets(name, monkeypatch):
    """A :class:`bils.GroupedGrid` ``scale`` (per group and RHS) and ``offset`` (per group)
    with dask targets: each task gets its chunk's columns of the values (never an (n, k)
    array) and the result is the in-memory one, for several chunkings, slices of wide
    chunks, and problems with a shared ordering (the group map permuted)."""
    import bils._dask as bd

    solver, kw = SOLVERS[name]
    rng = np.random.default_rng(29)
    n, k = 9, 40
    R = np.triu(rng.standard_normal((n, n))) * 0.4 + 2 * np.eye(n)
    Y = rng.standard_normal((n, k)) * 4
    groups = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    S = bils.GroupedGrid(rng.uniform(0.5, 2.0, (3, k)), groups)
    O = bils.GroupedGrid(rng.uniform(-0.5, 0.5, 3), groups)
    ref = solver(R, Y, -4, 4, scale=S, offset=O, backend="numba", **kw)
    seen = []
    real = bd._solve_block_here

    def spy(R_, Y_, lo_, hi_, scale_, *args, **kwargs):
        seen.append(type(scale_).__name__)
        return real(R_, Y_, lo_, hi_, scale_, *args, **kwargs)

    monkeypatch.setattr(bd, "_solve_block_here", spy)
    for chunks, slice_elements in ((7, None), (40, None), (40, n * 6)):
        if slice_elements:
            monkeypatch.setattr(bd, "SOLVE_SLICE_ELEMENTS", slice_elements)
        got = solver(R, da.from_array(Y, chunks=(n, chunks)), -4, 4, scale=S, offset=O,
                     backend="numba", **kw).compute(scheduler="sync")
        _same(ref, got, exact_cost=name != "enumerate")
    assert seen and set(seen) == {"ndarray"}  # the values' columns travel, not the grid object
    T = np.linalg.solve(R, Y)
    for order in ("natural", "diag"):
        P = bils.BILSProblem.from_triangular(R, Y, -4, 4, scale=S, offset=O, ordering=order)
        Pd = bils.BILSProblem.from_triangular(R, da.from_array(Y, chunks=(n, 13)), -4, 4,
                                              scale=S, offset=O, ordering=order)
        a, b = solver(P, backend="numba", **kw), solver(Pd, backend="numba", **kw).compute(scheduler="sync")
        np.testing.assert_array_equal(b.x, a.x)
        np.testing.assert_allclose(b.cost, a.cost, rtol=1e-9)
    G = bils.BILSProblem.from_gram(R.T @ R, da.from_array(R.T @ R @ T, chunks=(n, 16)), -4, 4,
                                   scale=S, offset=O, ordering="diag")
    a = solver(bils.BILSProblem.from_gram(R.T @ R, R.T @ R @ T, -4, 4, scale=S, offset=O,
                                          ordering="diag"), backend="numba", **kw)
    np.testing.assert_array_equal(solver(G, backend="numba", **kw).x.compute(scheduler="sync"), a.x)


def test_grouped_grid_bounds_and_shapes_are_refused_with_dask_targets():
    R = np.eye(4) * 2
    Yd = da.from_array(np.ones((4, 6)), chunks=(4, 3))
    G = bils.GroupedGrid(np.ones((2, 6)), [0, 0, 1, 1])
    with pytest.raises(TypeError, match="`lo`.*GroupedGrid"):
        bils.babai(R, Yd, G, 4)
    with pytest.raises(ValueError, match="`scale`.*GroupedGrid.*broadcastable"):
        bils.babai(R, Yd, 0, 4, scale=bils.GroupedGrid(np.ones((2, 5)), [0, 0, 1, 1]))
    with pytest.raises(TypeError, match="`hi`.*GroupedGrid"):
        bils.BILSProblem.from_triangular(R, Yd, 0, G)


@pytest.fixture
def r_as_key(monkeypatch):
    """R as one graph key whatever its size (the path of a large R)."""
    import bils._dask as bd

    monkeypatch.setattr(bd, "INLINE_R_BYTES", 0)


def test_small_R_goes_inside_every_solve_task():
    R, Y, lo, hi, S, O = _case(3)
    res = bils.kbest(R, da.from_array(Y, chunks=(9, 5)), lo, hi, scale=S, offset=O, backend="numpy")
    graph = dict(res.x.__dask_graph__())
    assert not any(isinstance(key, str) and key.startswith("bils-R-") for key in graph)
    solves = [key for key in graph if isinstance(key, tuple) and re.fullmatch(r"bils-kbest-[0-9a-f]+", key[0])]
    assert len(solves) == 8
    # a solve depends on its Y block (and the per-RHS grid blocks) only: nothing to wait for
    assert all(not any(isinstance(d, str) for d in dask.core.get_dependencies(graph, key)) for key in solves)
    # the same in the graph that runs: no R task among the fused solve-and-sum tasks
    from dask.base import collections_to_expr

    opt = dict(collections_to_expr([res.cost.sum()]).optimize().__dask_graph__())
    assert "bils-R" not in _prefixes(opt)
    assert not bils._dask.inline_R(np.eye(512), 8)  # 2 MiB: one key
    ref = bils.kbest(R, Y, lo, hi, scale=S, offset=O, backend="numpy")
    _same(ref, res.compute(scheduler="sync"), exact_cost=False)


def test_R_is_one_graph_key_for_every_chunk(r_as_key):
    R, Y, lo, hi, S, O = _case(3)
    res = bils.kbest(R, da.from_array(Y, chunks=(9, 5)), lo, hi, scale=S, offset=O, backend="numpy")
    graph = {}
    for a in (res.x, res.cost, res.status):
        graph.update(dict(a.__dask_graph__()))
    r_keys = [key for key in graph if isinstance(key, str) and key.startswith("bils-R-")]
    assert len(r_keys) == 1
    solves = [key for key in graph if isinstance(key, tuple)
              and re.fullmatch(r"bils-kbest-[0-9a-f]+", key[0])]
    assert len(solves) == 8
    deps = {key: dask.core.get_dependencies(graph, key) for key in solves}
    assert all(r_keys[0] in d for d in deps.values())
    # R itself appears once in the graph: count the tasks holding an (n, n) array equal to R
    def holds_R(task):
        data = getattr(task, "value", task)
        return isinstance(data, np.ndarray) and data.shape == R.shape and np.array_equal(data, R)
    assert sum(holds_R(t) for t in graph.values()) == 1


@pytest.mark.parametrize("lo, hi, dtype", [(0, 15, np.int8), (-128, 127, np.int8), (-129, 3, np.int16),
                                           (0, 40000, np.int32), (0, 2**40, np.int64),
                                           (np.array([[-3], [0]]), np.array([[2], [300]]), np.int16)])
def test_codes_come_in_the_smallest_type_holding_the_box(lo, hi, dtype):
    rng = np.random.default_rng(15)
    R = np.array([[1.0, 0.3], [0.0, 0.02]])
    Y = rng.uniform(-200.0, 1000.0, (2, 30))
    ref = bils.babai(R, Y, lo, hi, backend="numpy")
    lazy = bils.babai(R, da.from_array(Y, chunks=(2, 7)), lo, hi, backend="numpy")
    assert lazy.x.dtype == dtype and lazy.status.dtype == np.int8
    got = lazy.compute(scheduler="sync")
    assert got.x.dtype == dtype
    np.testing.assert_array_equal(got.x, ref.x)  # the same values (the bounds are reached)
    assert got.x.min() == ref.x.min() and got.x.max() == ref.x.max()


def test_dask_bounds_keep_int64_codes():
    R, Y, lo, hi, S, O = _case(16)
    lazy = bils.babai(R, da.from_array(Y, chunks=(9, 8)), lo, da.from_array(hi, chunks=(9, 8)),
                      backend="numpy")
    assert lazy.x.dtype == np.int64
    np.testing.assert_array_equal(lazy.compute(scheduler="sync").x, bils.babai(R, Y, lo, hi, backend="numpy").x)


def test_one_layer_of_solves_under_every_output(r_as_key):
    R, Y, lo, hi, S, O = _case(17)
    res = bils.klein(R, da.from_array(Y, chunks=(9, 10)), lo, hi, n_samples=3, rng=1, backend="numpy")
    graph = res.x.__dask_graph__()
    solve = [name for name in graph.layers if re.fullmatch(r"bils-klein-[0-9a-f]+", name)]
    assert len(solve) == 1
    assert graph.dependencies[res.x.name] == set(solve)
    assert set(res.cost.__dask_graph__().layers[solve[0]]) == set(graph.layers[solve[0]])
    # the getter layers hold only their own blocks: one task per chunk
    assert len(graph.layers[res.x.name]) == 4
    # a getter and the blockwise step after it (a reduction's chunk step) are one task:
    # 4 solves, 4 fused get-and-sum tasks per output, the aggregations, R; no alias tasks
    from dask.base import collections_to_expr

    opt = dict(collections_to_expr([res.cost.sum(), res.x.sum(axis=1)]).optimize().__dask_graph__())
    kinds = {}
    for key, task in opt.items():
        prefix = (key[0] if isinstance(key, tuple) else key).rsplit("-", 1)[0]
        if prefix != "array":  # Y's blocks
            kinds[prefix] = kinds.get(prefix, 0) + 1
        assert type(task).__name__ != "Alias", key
    assert kinds == {"bils-klein": 4, "sum": 8, "sum-aggregate": 2, "bils-R": 1}, kinds
    # one output alone: the solve layer is blockwise too, so the solve, the getter and the
    # partial sum are one task per chunk (no alias task left by a renaming fusion)
    for alone, want in ((res.cost.sum(), {"sum": 4, "sum-aggregate": 1}),
                        (res.x.sum(axis=1), {"sum": 4, "sum-aggregate": 1}),
                        (da.map_blocks(np.negative, res.status), {"negative": 4})):
        opt = dict(collections_to_expr([alone]).optimize().__dask_graph__())
        assert not any(type(t).__name__ == "Alias" for t in opt.values())
        kinds = _prefixes(opt)
        assert kinds.pop("array") == 4 and kinds.pop("bils-R") == 1  # Y's blocks, R
        assert kinds == want, kinds
    ref = bils.klein(R, Y, lo, hi, n_samples=3, rng=1, backend="numpy")
    cost_sum, x_sum, neg = dask.compute(res.cost.sum(), res.x.sum(axis=1), da.map_blocks(np.negative, res.status),
                                        scheduler="sync")
    assert cost_sum == pytest.approx(ref.cost.sum(), rel=1e-12)
    np.testing.assert_array_equal(x_sum, ref.x.sum(axis=1))
    np.testing.assert_array_equal(neg, -ref.status)
    # x, cost, status and the per-RHS info computed together solve each chunk once
    calls = []
    import bils._dask as bd
    orig = bd._solve_block

    def counting(*args, **kw):
        calls.append(kw["j0"])
        return orig(*args, **kw)

    bd._solve_block = counting
    try:
        res = bils.klein(R, da.from_array(Y, chunks=(9, 10)), lo, hi, n_samples=3, rng=1, backend="numpy")
        res.compute(scheduler="sync")
    finally:
        bd._solve_block = orig
    assert sorted(calls) == [0, 10, 20, 30]


def test_persist_solves_once_and_keeps_lazy_fields():
    R, Y, lo, hi, S, O = _case(18)
    ref = bils.klein(R, Y, lo, hi, scale=S, n_samples=4, rng=3, backend="numpy")
    lazy = bils.klein(R, da.from_array(Y, chunks=(9, 12)), lo, hi, scale=S, n_samples=4, rng=3,
                      backend="numpy")
    kept = lazy.persist(scheduler="sync")
    assert kept.is_lazy and isinstance(kept.info["improved"], da.Array)
    # persisted fields are getters of finished per-chunk tuples: one kept key per chunk
    # (x, cost, status, info together), no solve task left
    graph = dict(kept.x.__dask_graph__())
    kept_keys = [key for key in graph if key[0] != kept.x.name]
    assert len(kept_keys) == 4 and len(graph) == 8
    assert all(isinstance(graph[key], tuple) and graph[key][0].dtype == np.int8 for key in kept_keys)
    _same(ref, kept.compute(scheduler="sync"), exact_cost=False)
    assert float(kept.cost.sum().compute()) == pytest.approx(float(ref.cost.sum()), rel=1e-12)
    plain = bils.babai(R, Y, lo, hi, backend="numpy")
    assert plain.persist() is plain


@pytest.mark.parametrize("dtype, copied", [(np.float64, False), (np.float32, True)])
def test_a_float64_chunk_reaches_the_kernel_without_a_copy(dtype, copied):
    import bils._dask as bd
    from bils.babai import KERNELS

    seen = []

    def kernel(can, **options):
        seen.append(can.Y)
        return KERNELS["numpy"]()(can, **options)

    R, Y, lo, hi, S, O = _case(19)
    block = np.ascontiguousarray(Y[:, :10], dtype=dtype)
    x, cost, status, info = bd._solve_block(
        R, block, np.zeros((1, 1)), np.full((1, 1), 3), np.ones((1, 1)), np.zeros((1, 1)), None,
        solver="babai", kernels={"numpy": lambda: kernel}, backend="numpy",
        options={"block_size": 4, "precision": "float64"}, rhs_names=(), j0=0, k_total=10,
        perm=None, dead=None, info_keys=(), code_dtype=np.dtype(np.int8))
    assert np.shares_memory(seen[0], block) != copied  # float32 chunks are converted once
    assert x.dtype == np.int8 and status.dtype == np.int8 and cost.dtype == np.float64
    np.testing.assert_array_equal(x, bils.babai(R, block, 0, 3, block_size=4, backend="numpy").x)


def test_problem_with_dask_targets_from_gram():
    rng = np.random.default_rng(4)
    n, k = 12, 30
    X = rng.standard_normal((n, 40))
    H = X @ X.T
    H[2], H[:, 2] = 0.0, 0.0  # a dead input
    T = rng.standard_normal((n, k))
    S = rng.uniform(0.2, 0.4, (n, k))
    for ordering in ("natural", "diag"):
        ref = bils.BILSProblem.from_gram(H, T, 0, 7, scale=S, offset=-4 * S, damp=0.01,
                                         ordering=ordering)
        lazy = bils.BILSProblem.from_gram(H, da.from_array(T, chunks=(5, 8)), 0, 7, scale=S,
                                          offset=-4 * S, damp=0.01, ordering=ordering)
        assert isinstance(lazy.Y, da.Array)
        np.testing.assert_allclose(lazy.Y.compute(), ref.Y, rtol=1e-13, atol=1e-13)
        for name, (solver, kw) in SOLVERS.items():
            a = solver(ref, backend="numba", **kw)
            b = solver(lazy, backend="numba", **kw).compute(scheduler="threads")
            np.testing.assert_array_equal(b.x, a.x, err_msg=f"{name} {ordering}")
            np.testing.assert_allclose(b.cost, a.cost, rtol=1e-12)


def test_problem_from_design_and_triangular_with_dask_targets():
    rng = np.random.default_rng(6)
    A = rng.standard_normal((20, 6))
    B = rng.standard_normal((20, 25)) * 4
    for ordering in ("natural", "sqrd"):
        ref = bils.BILSProblem.from_design(A, B, -5, 5, ordering=ordering)
        lazy = bils.BILSProblem.from_design(A, da.from_array(B, chunks=(7, 9)), -5, 5, ordering=ordering)
        a, b = bils.babai(ref, backend="numpy"), bils.babai(lazy, backend="numpy").compute()
        np.testing.assert_array_equal(b.x, a.x)
        np.testing.assert_allclose(b.cost, a.cost, rtol=1e-12)  # includes the cost offset
        R = ref.R
        ref_t = bils.BILSProblem.from_triangular(R, B[:6], -5, 5, ordering=ordering)
        lazy_t = bils.BILSProblem.from_triangular(R, da.from_array(B[:6], chunks=(6, 4)), -5, 5,
                                                  ordering=ordering)
        np.testing.assert_array_equal(bils.kbest(lazy_t, backend="numpy").compute().x,
                                      bils.kbest(ref_t, backend="numpy").x)


def test_single_rhs_and_dask_grid_only():
    R, Y, lo, hi, S, O = _case(7)
    ref = bils.babai(R, Y[:, 0], -3, 3, backend="numpy")
    lazy = bils.babai(R, da.from_array(Y[:, 0], chunks=4), -3, 3, backend="numpy")
    assert lazy.x.shape == (9,) and lazy.cost.shape == ()
    got = lazy.compute()
    np.testing.assert_array_equal(got.x, ref.x)
    assert got.cost.shape == () and np.isclose(got.cost, ref.cost)
    # Y in memory, only the per-RHS scale lazy: chunked like the scale
    ref = bils.babai(R, Y, lo, hi, scale=S, backend="numpy")
    lazy = bils.babai(R, Y, lo, hi, scale=da.from_array(S, chunks=(9, 11)), backend="numpy")
    assert lazy.x.chunks[1] == (11, 11, 11, 7)
    np.testing.assert_array_equal(lazy.compute().x, ref.x)


def test_resolve_backend_reads_the_chunk_type():
    Yd = da.zeros((3, 4), chunks=(3, 2))
    assert bils.resolve_backend("numpy", Yd) == "numpy"
    assert bils.resolve_backend("auto", Yd) in ("numba", "numpy")


def test_errors_name_the_argument():
    R, Y, lo, hi, S, O = _case(8)
    Yd = da.from_array(Y, chunks=(9, 10))
    with pytest.raises(TypeError, match="`R` must be an in-memory array"):
        bils.babai(da.from_array(R), Yd, lo, hi)
    with pytest.raises(ValueError, match=r"`Y` must have `R.shape\[0\]` = 9 rows"):
        bils.babai(R, Yd[:5], lo, hi)
    with pytest.raises(ValueError, match="`scale` must be broadcastable"):
        bils.babai(R, Yd, lo, hi, scale=np.ones((9, 3)))
    with pytest.raises(NotImplementedError, match="chang_han"):
        bils.BILSProblem.from_triangular(R, Yd, lo, hi, ordering="chang_han")
    bad = Y.copy()
    bad[0, 33] = np.nan
    lazy = bils.babai(R, da.from_array(bad, chunks=(9, 10)), lo, hi, backend="numpy")
    with pytest.raises(ValueError, match="`Y` must be finite"):  # values are checked per chunk
        lazy.compute(scheduler="sync")


# ---------------------------------------------------------------------- 2-process cluster
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_local_cluster_equals_in_memory(client, name):
    solver, kw = SOLVERS[name]
    R, Y, lo, hi, S, O = _case(9)
    ref = solver(R, Y, lo, hi, scale=S, offset=O, backend="numpy", **kw)
    for cols in (5, 16, 40):
        lazy = _lazy(solver, R, Y, lo, hi, S, O, cols, backend="numpy", **kw)
        _same(ref, _compute(client, lazy), exact_cost=False)


@pytest.mark.slow
def test_local_cluster_numba_and_problem(client):
    rng = np.random.default_rng(10)
    n, k = 16, 64
    X = rng.standard_normal((n, 50))
    T = rng.standard_normal((n, k))
    S = np.full((n, 1), 0.3)
    ref = bils.BILSProblem.from_gram(X @ X.T, T, 0, 7, scale=S, offset=-1.2, ordering="diag")
    lazy = bils.BILSProblem.from_gram(X @ X.T, da.from_array(T, chunks=(n, 10)), 0, 7, scale=S,
                                      offset=-1.2, ordering="diag")
    for solver, kw in ((bils.babai, {}), (bils.klein, {"n_samples": 4, "rng": 2})):
        a = solver(ref, backend="numba", **kw)
        b = _compute(client, solver(lazy, backend="numba", **kw))
        np.testing.assert_array_equal(b.x, a.x)
        np.testing.assert_allclose(b.cost, a.cost, rtol=1e-12)


def _incoming_transfers(dask_worker, key):
    return sum(1 for t in dask_worker.transfer_incoming_log for k in t.get("keys", {}) if k == key)


@pytest.mark.slow
def test_R_travels_at_most_once_to_each_worker(client, r_as_key):
    R, Y, lo, hi, S, O = _case(14, k=400)
    res = bils.babai(R, da.from_array(Y, chunks=(9, 10)), lo, hi, scale=S, backend="numpy")
    r_key = next(k for k in dict(res.x.__dask_graph__()) if isinstance(k, str) and k.startswith("bils-R-"))
    before = client.run(_incoming_transfers, key=r_key)
    _compute(client, res)  # 40 chunk tasks over 2 workers
    after = client.run(_incoming_transfers, key=r_key)
    assert all(after[w] - before.get(w, 0) <= 1 for w in after), after


@pytest.mark.slow
def test_worker_killed_mid_solve_gives_the_same_result(client):
    # numpy K-best with a wide beam: each chunk takes a noticeable time. A fast machine may
    # finish before a worker is caught mid-solve: then try again on more columns.
    kw = {"beam_width": 48, "n_children": 7}
    for k in (240, 720, 2160):
        R, Y, lo, hi, S, O = _case(12, n=14, k=k)
        lazy = bils.kbest(R, da.from_array(Y, chunks=(14, 20)), lo, hi, scale=S, offset=O,
                          backend="numpy", **kw)
        pids = client.run(os.getpid)
        fut = client.compute([lazy.x, lazy.cost, lazy.status])
        # wait until a worker is busy with solve tasks (both, if they get there), then SIGKILL it
        victim = None
        start = time.monotonic()
        deadline = start + TIMEOUT
        while not all(f.done() for f in fut) and time.monotonic() < deadline:
            busy = sorted(w for w, ks in client.processing().items()
                          if any("bils-kbest" in str(key) for key in ks))
            if len(busy) == 2 or (busy and time.monotonic() > start + 0.5):
                victim = busy[0]
                break
            time.sleep(0.02)
        if victim is None or all(f.done() for f in fut):
            [f.result(timeout=TIMEOUT) for f in fut]
            continue  # finished before a kill: a larger problem
        os.kill(pids[victim], signal.SIGKILL)  # a process this test's cluster started
        x, cost, status = [f.result(timeout=TIMEOUT) for f in fut]
        ref = bils.kbest(R, Y, lo, hi, scale=S, offset=O, backend="numpy", **kw)
        np.testing.assert_array_equal(x, ref.x)
        np.testing.assert_array_equal(status, ref.status)
        np.testing.assert_allclose(cost, ref.cost, rtol=1e-12)
        break
    else:
        pytest.fail("the solve always finished before a worker could be killed mid-solve")
    client.wait_for_workers(2, timeout=TIMEOUT)  # the nanny restarts the killed worker


# ---------------------------------------------------------------------- one task per chunk
def _summary(x, cost, status):
    """Partial sums of one chunk: total cost, code row sums, status counts."""
    return cost.sum(), x.astype(np.int64).sum(axis=-1), np.bincount(status, minlength=3)


def _same_summary(got, ref):
    assert got[0] == pytest.approx(ref[0], rel=1e-12)
    np.testing.assert_array_equal(got[1], ref[1])
    np.testing.assert_array_equal(got[2], ref[2])


class _TaskLog(dask.callbacks.Callback):
    """The keys of the tasks a local scheduler runs."""

    def __init__(self):
        super().__init__()
        self.keys = []

    def _pretask(self, key, dsk, state):
        self.keys.append(key)


def _prefixes(keys):
    out = {}
    for key in keys:
        prefix = (key[0] if isinstance(key, tuple) else key).rsplit("-", 1)[0]
        out[prefix] = out.get(prefix, 0) + 1
    return out


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("cols", (1, 7, 40))
def test_reduce_chunks_equals_in_memory(name, cols):
    solver, kw = SOLVERS[name]
    R, Y, lo, hi, S, O = _case(20)
    ref = solver(R, Y, lo, hi, scale=S, offset=O, backend="numba", **kw)
    want = _summary(ref.x, ref.cost, ref.status)
    _same_summary(ref.reduce_chunks(_summary), want)  # in memory: the value at once
    lazy = _lazy(solver, R, Y, lo, hi, S, O, cols, backend="numba", **kw)
    got = lazy.reduce_chunks(_summary)
    assert isinstance(got, Delayed)
    _same_summary(got.compute(scheduler="threads"), want)
    # the partial results arrive in column order; a custom aggregate sees all of them
    parts = lazy.reduce_chunks(lambda x, c, s: c, aggregate=np.concatenate).compute(scheduler="sync")
    np.testing.assert_array_equal(parts, ref.cost)
    # on a persisted result the kept chunks are reduced, without solving again
    kept = lazy.persist(scheduler="sync")
    log = _TaskLog()
    with log:
        _same_summary(kept.reduce_chunks(_summary).compute(scheduler="sync"), want)
    assert not any(re.fullmatch(rf"bils-{name}-[0-9a-f]+", p) for p in _prefixes(log.keys))


def test_reduce_chunks_runs_one_task_per_chunk_and_one_aggregation(r_as_key):
    R, Y, lo, hi, S, O = _case(21)
    lazy = bils.babai(R, da.from_array(Y, chunks=(9, 10)), lo, hi, scale=S, backend="numba")
    log = _TaskLog()
    with log:
        total = lazy.reduce_chunks(_summary).compute(scheduler="sync")
    kinds = _prefixes(log.keys)
    kinds.pop("array", None)  # Y's blocks
    assert kinds == {"bils-reduce-chunk": 4, "bils-reduce": 1}, kinds  # R is data, not a task
    graph = dict(lazy.reduce_chunks(_summary).__dask_graph__())
    assert sum(isinstance(key, str) and key.startswith("bils-R-") for key in graph) == 1
    ref = bils.babai(R, Y, lo, hi, scale=S, backend="numba")
    _same_summary(total, _summary(ref.x, ref.cost, ref.status))
    # single 1-D right-hand side: x (n,), a 0-d cost and status, as in the result
    one = bils.babai(R, da.from_array(Y[:, 3], chunks=4), lo[:, 0], hi[:, 3], backend="numba")
    got = one.reduce_chunks(lambda x, c, s: (x.shape, c.shape, s.shape)).compute(scheduler="sync")
    assert got == ((9,), (), ())


@pytest.mark.parametrize("kept", (False, True))
def test_reduce_chunks_computed_here_runs_no_aggregation_task(kept):
    R, Y, lo, hi, S, O = _case(27)
    lazy = bils.klein(R, da.from_array(Y, chunks=(9, 7)), lo, hi, scale=S, offset=O, n_samples=4, rng=5,
                      backend="numba")
    if kept:
        lazy = lazy.persist(scheduler="sync")
    ref = bils.klein(R, Y, lo, hi, scale=S, offset=O, n_samples=4, rng=5, backend="numba")
    log = _TaskLog()
    with log:
        got = lazy.reduce_chunks(_summary, compute=True, scheduler="sync")
    kinds = _prefixes(log.keys)
    kinds.pop("array", None)
    assert kinds == {"bils-reduce-chunk": 6}, kinds  # 40 columns in 6 chunks, no "bils-reduce"
    _same_summary(got, _summary(ref.x, ref.cost, ref.status))
    # the aggregation gets the partial results in column order
    cols = lazy.reduce_chunks(lambda x, c, s: c, aggregate=np.concatenate, compute=True, scheduler="sync")
    np.testing.assert_array_equal(cols, ref.cost)
    # in memory: the value, whatever `compute` says
    assert ref.reduce_chunks(lambda x, c, s: c.size, compute=True) == 40
    with pytest.raises(TypeError, match="compute=True"):
        lazy.reduce_chunks(_summary, scheduler="sync")


def test_compute_runs_the_solves_and_nothing_else():
    R, Y, lo, hi, S, O = _case(22)
    ref = bils.enumerate(R, Y, lo, hi, scale=S, max_nodes=500, n_best=2, backend="numba")
    lazy = bils.enumerate(R, da.from_array(Y, chunks=(9, 15)), lo, hi, scale=S, max_nodes=500,
                          n_best=2, backend="numba")
    log = _TaskLog()
    with log:
        got = lazy.compute(scheduler="sync")
    kinds = _prefixes(log.keys)
    kinds.pop("array", None)
    assert kinds == {"bils-enumerate": 3}, kinds  # no getter, no concatenation task
    assert got.x.dtype == np.int8 and not got.is_lazy and got._chunks is None
    _same(ref, got, exact_cost=False)
    np.testing.assert_array_equal(got.info["best_x"], ref.info["best_x"])


def test_reduce_chunks_needs_a_solver_result():
    R, Y, lo, hi, S, O = _case(23)
    lazy = bils.babai(R, da.from_array(Y, chunks=(9, 10)), lo, hi, backend="numpy")
    by_hand = bils.BILSResult(lazy.x, lazy.cost, lazy.status, "numpy", "babai")
    with pytest.raises(TypeError, match="`reduce_chunks` needs a lazy result made by a solver"):
        by_hand.reduce_chunks(_summary)
    np.testing.assert_array_equal(by_hand.compute(scheduler="sync").x, lazy.compute(scheduler="sync").x)


@pytest.mark.slow
def _numba_threads_in_a_solve():
    """In a worker's task: the numba thread count inside each chunk's solve, before and after."""
    import numba

    import bils._dask as bd
    import bils._driver as driver

    R, Y, lo, hi, S, O = _case(25)
    seen, real = [], driver.run_solver

    def spy(*args, **kwargs):
        seen.append(numba.get_num_threads())
        return real(*args, **kwargs)

    driver.run_solver = spy  # what each chunk's solve task calls
    try:
        before = numba.get_num_threads()
        got = bils.babai(R, da.from_array(Y, chunks=(9, 10)), lo, hi, backend="numba").compute(scheduler="sync")
        after = numba.get_num_threads()
    finally:
        driver.run_solver = real
    np.testing.assert_array_equal(got.x, bils.babai(R, Y, lo, hi, backend="numba").x)
    return bd.worker_numba_threads(), seen, before, after, "NUMBA_NUM_THREADS" in os.environ


def test_numba_threads_follow_the_worker(client):
    assert bils._dask.worker_numba_threads() is None  # not in a worker
    pinned, seen, before, after, numba_env = client.submit(_numba_threads_in_a_solve, pure=False).result(TIMEOUT)
    assert len(seen) == 4 and after == before
    if numba_env:  # the worker's environment says how many: numba's own setting applies
        assert pinned is None and set(seen) == {before}
    else:  # the nanny's OMP_NUM_THREADS=1: one numba thread per worker thread
        assert pinned == 1 and set(seen) == {1}


def test_gather_on_a_client_fetches_chunks_as_they_finish(client):
    from bils._dask import _sync_client

    assert _sync_client({}) is client and _sync_client({"scheduler": client}) is client
    assert _sync_client({"scheduler": "threads"}) is None and _sync_client({"optimize_graph": False}) is None
    # 29 uneven chunks over 2 workers finish out of order: the join keeps column order
    R, Y, lo, hi, S, O = _case(26, k=200)
    ref = bils.kbest(R, Y, lo, hi, scale=S, offset=O, beam_width=3, backend="numba")
    lazy = _lazy(bils.kbest, R, Y, lo, hi, S, O, 7, beam_width=3, backend="numba")
    _same(ref, lazy.compute(), exact_cost=True)
    _same(ref, lazy.compute(scheduler="sync"), exact_cost=True)


def test_local_cluster_reduce_chunks_and_gather(client):
    R, Y, lo, hi, S, O = _case(24, k=120)
    ref = bils.klein(R, Y, lo, hi, scale=S, offset=O, n_samples=5, rng=11, backend="numba")
    lazy = _lazy(bils.klein, R, Y, lo, hi, S, O, 13, backend="numba", n_samples=5, rng=11)
    _same_summary(client.compute(lazy.reduce_chunks(_summary)).result(timeout=TIMEOUT),
                  _summary(ref.x, ref.cost, ref.status))
    # computed here: partial results fetched as the chunks finish, in column order
    _same_summary(lazy.reduce_chunks(_summary, compute=True), _summary(ref.x, ref.cost, ref.status))
    np.testing.assert_array_equal(lazy.reduce_chunks(lambda x, c, s: c, aggregate=np.concatenate, compute=True),
                                  ref.cost)
    _same(ref, lazy.compute(), exact_cost=True)  # gathered through the per-chunk tuples
    kept = lazy.persist()
    distributed.wait([kept.x, kept.cost], timeout=TIMEOUT)
    _same(ref, kept.compute(), exact_cost=True)
    _same_summary(kept.reduce_chunks(_summary).compute(), _summary(ref.x, ref.cost, ref.status))
