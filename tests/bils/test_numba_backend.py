"""The numba backend against the numpy reference: parity, thread-count independence, no-JIT.

The generic contract (feasibility, cost identity, multi-RHS = loop, ...) runs on every
backend in ``test_properties.py``; this module checks what is specific to the numba
kernels: costs equal the numpy backend's to 1e-9 (relative) and codes are equal on
tie-free data, across the grid layouts the kernels special-case (scalar, per-coordinate,
per-RHS and full (n, k) scale/offset/box, zero-stride broadcast views), block sizes and
RHS counts that cross the kernels' tile and panel boundaries; identical results with
``NUMBA_NUM_THREADS=1`` and ``2``; and that the kernels still run with
``NUMBA_DISABLE_JIT=1``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import bils
import bils.testing

numba = pytest.importorskip("numba")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
RTOL = 1e-9


def _problem(n, k, grid, seed, box=(0, 7)):
    """A tie-free random problem; ``grid`` picks the layout of scale/offset/lo/hi."""
    rng = np.random.default_rng(seed)
    R = np.triu(rng.normal(0, 0.4, (n, n)), 1) + np.diag(rng.uniform(0.6, 2.0, n)
                                                        * rng.choice([-1, 1], n))
    lo, hi = box
    if grid == "scalar":
        scale, offset = 0.7, -0.3
    elif grid == "per_coord":  # (n, 1): zero stride along RHS
        scale, offset = rng.uniform(0.3, 1.5, (n, 1)), rng.normal(0, 1, (n, 1))
        lo, hi = rng.integers(-3, 1, (n, 1)), rng.integers(2, 6, (n, 1))
    elif grid == "per_rhs":  # (1, k): zero stride along levels
        scale, offset = rng.uniform(0.3, 1.5, (1, k)), rng.normal(0, 1, (1, k))
        lo, hi = rng.integers(-3, 1, (1, k)), rng.integers(2, 6, (1, k))
    elif grid == "full":  # (n, k), e.g. GPTQ group scales repeated over rows
        scale, offset = rng.uniform(0.3, 1.5, (n, k)), rng.normal(0, 1, (n, k))
        lo, hi = rng.integers(-3, 1, (n, k)), rng.integers(2, 6, (n, k))
    else:  # "none": plain BILS, S = 1, O = 0
        scale = offset = None
    s = 1.0 if scale is None else np.broadcast_to(scale, (n, k))
    o = 0.0 if offset is None else np.broadcast_to(offset, (n, k))
    x_true = rng.uniform(np.broadcast_to(lo, (n, k)) - 1, np.broadcast_to(hi, (n, k)) + 1)
    Y = R @ (s * x_true + o) + rng.normal(0, 0.05, (n, k))
    return R, Y, lo, hi, scale, offset


def _solve(fn, prob, backend, **kw):
    R, Y, lo, hi, scale, offset = prob
    return fn(R, Y, lo, hi, scale=scale, offset=offset, backend=backend, **kw)


def _assert_parity(a, b, what):
    assert b.backend == "numba" and a.backend == "numpy"
    np.testing.assert_allclose(b.cost, a.cost, rtol=RTOL, atol=1e-12, err_msg=what)
    np.testing.assert_array_equal(b.x, a.x, err_msg=what)
    np.testing.assert_array_equal(b.status, a.status, err_msg=what)


GRIDS = ("none", "scalar", "per_coord", "per_rhs", "full")


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("n, k, block_size", [(1, 1, 128), (7, 3, 2), (37, 70, 8),
                                               (130, 33, 128), (200, 65, 64), (600, 40, 128)])
@pytest.mark.parametrize("min_panel", [None, 1])
def test_babai_parity(grid, n, k, block_size, min_panel, monkeypatch):
    if min_panel is not None:  # panels of exactly block_size levels: many BLAS products
        import bils._numba.babai as nbb

        monkeypatch.setattr(nbb, "MIN_PANEL", min_panel)
    prob = _problem(n, k, grid, seed=n * 1000 + k)
    a = _solve(bils.babai, prob, "numpy", block_size=block_size)
    b = _solve(bils.babai, prob, "numba", block_size=block_size)
    _assert_parity(a, b, f"babai {grid} n={n} k={k}")


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("n, k, block_size", [(1, 1, 128), (37, 70, 8), (600, 40, 128)])
def test_babai_float32(grid, n, k, block_size):
    """Single precision: same codes as float64 on tie-free problems on both backends;
    costs consistent with the problem to float32 accuracy; numba == numpy reference."""
    prob = _problem(n, k, grid, seed=n * 1000 + k + 1)
    ref = _solve(bils.babai, prob, "numpy", block_size=block_size)
    a = _solve(bils.babai, prob, "numpy", block_size=block_size, precision="float32")
    b = _solve(bils.babai, prob, "numba", block_size=block_size, precision="float32")
    assert a.info["precision"] == b.info["precision"] == "float32"
    for r in (a, b):
        assert r.x.dtype == np.int64 and r.cost.dtype == np.float64
        assert np.mean(r.x == ref.x) >= 0.999  # away from ties (rare in this fixture)
        np.testing.assert_allclose(r.cost, bils.testing.as_case(prob).cost(r.x), rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(b.cost, a.cost, rtol=2e-4, atol=1e-5)


def test_babai_precision_argument():
    prob = _problem(5, 2, "scalar", seed=3)
    with pytest.raises(ValueError, match="`precision` must be one of"):
        _solve(bils.babai, prob, "numpy", precision="float16")


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("n, k, block_size", [(1, 2, 128), (9, 5, 3), (40, 40, 16), (150, 20, 64)])
@pytest.mark.parametrize("min_panel", [None, 1])
def test_klein_parity(grid, n, k, block_size, min_panel, monkeypatch):
    if min_panel is not None:  # panels of exactly block_size levels: many products, corrections
        import bils._numba.klein as nbk

        monkeypatch.setattr(nbk, "MIN_PANEL", min_panel)
    prob = _problem(n, k, grid, seed=7 * n + k)
    for tau in ("auto", 0.3, 3.0):
        kw = dict(n_samples=5, tau=tau, rng=11, block_size=block_size)
        a = _solve(bils.klein, prob, "numpy", **kw)
        b = _solve(bils.klein, prob, "numba", **kw)
        _assert_parity(a, b, f"klein {grid} n={n} tau={tau}")
        np.testing.assert_array_equal(b.info["improved"], a.info["improved"])


def test_klein_uniforms_match_rng_module():
    from bils._numba._common import uniform
    from bils._rng import uniform as np_uniform

    seeds = np.random.default_rng(0).integers(0, 2**63, 50, dtype=np.uint64)
    seeds[0], seeds[1] = 0, np.iinfo(np.uint64).max
    for sample, level, n in ((0, 0, 1), (3, 17, 40), (1000, 4095, 4096)):
        ref = np_uniform(seeds, sample, level, n)
        got = np.array([uniform(s, sample, level, n) for s in seeds])
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("n, k", [(1, 1), (6, 9), (33, 5)])
@pytest.mark.parametrize("beam, children", [(1, None), (4, None), (8, 8), (3, 5), (6, 2)])
def test_kbest_parity(grid, n, k, beam, children):
    # One box width per level for all RHS: the numpy reference sizes the candidate window
    # by the widest box among the RHS it processes together (see the multi-RHS
    # counterexample in test_properties.py); the numba kernel sizes it per RHS.
    R, Y, lo, hi, scale, offset = _problem(n, k, grid, seed=3 * n + k)
    lo, hi = (np.asarray(lo)[:, :1], np.asarray(hi)[:, :1]) if np.ndim(lo) else (lo, hi)
    prob = (R, Y, lo, hi, scale, offset)
    kw = dict(beam_width=beam, n_children=children)
    _assert_parity(_solve(bils.kbest, prob, "numpy", **kw), _solve(bils.kbest, prob, "numba", **kw),
                   f"kbest {grid} n={n} K={beam} C={children}")


def test_kbest_panels_and_corrections(monkeypatch):
    """Small panels force the reference-path corrections on every member."""
    import bils._numba.kbest as nkb

    R, Y, lo, hi, scale, offset = _problem(45, 12, "full", seed=5)
    prob = (R, Y, lo[:, :1], hi[:, :1], scale, offset)  # one box width per level
    ref = _solve(bils.kbest, prob, "numpy", beam_width=6)
    for panel in (1, 3, 8):
        monkeypatch.setattr(nkb, "PANEL", panel)
        _assert_parity(ref, _solve(bils.kbest, prob, "numba", beam_width=6), f"panel={panel}")
    monkeypatch.setattr(nkb, "_PATH_BYTES", 1)  # one RHS per chunk
    _assert_parity(ref, _solve(bils.kbest, prob, "numba", beam_width=6), "chunked")


@pytest.mark.parametrize("beam, children", [(8, None), (3, 2), (5, 8)])
def test_kbest_steps_across_panels(beam, children, monkeypatch):
    """Panels of 40 levels: steps of 16 levels (targets updated per step) end at 8-level
    partial steps and cross panel boundaries; a 3-bit box with many candidates per level
    prunes whole parents (and the Babai parent's non-Babai children)."""
    import bils._numba.kbest as nkb

    R, Y, lo, hi, scale, offset = _problem(100, 40, "full", seed=17)
    prob = (R, Y, 0, 7, scale, offset)
    kw = dict(beam_width=beam, n_children=children)
    ref = _solve(bils.kbest, prob, "numpy", **kw)
    monkeypatch.setattr(nkb, "PANEL", 40)
    _assert_parity(ref, _solve(bils.kbest, prob, "numba", **kw), f"K={beam} C={children}")


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("max_nodes, n_best", [(None, 1), (None, 4), (25, 1), (60, 3)])
def test_enumerate_parity(grid, max_nodes, n_best):
    prob = _problem(8, 6, grid, seed=8, box=(-2, 3))
    kw = dict(max_nodes=max_nodes, n_best=n_best)
    a = _solve(bils.enumerate, prob, "numpy", **kw)
    b = _solve(bils.enumerate, prob, "numba", **kw)
    _assert_parity(a, b, f"enumerate {grid}")
    np.testing.assert_array_equal(b.info["nodes"], a.info["nodes"])
    if n_best > 1:
        np.testing.assert_array_equal(b.info["best_x"], a.info["best_x"])
        np.testing.assert_allclose(b.info["best_cost"], a.info["best_cost"], rtol=RTOL)


def test_layer_problem_parity():
    """A GPTQ-shaped problem (Gram matrix, act-order, group grid as an (n, k) array)."""
    rng = np.random.default_rng(1)
    n, k, N = 96, 40, 300
    X = rng.standard_normal((n, N)) * np.exp(rng.normal(0, 0.5, (n, 1)))
    W = 0.02 * rng.standard_normal((k, n))
    scale = np.empty((n, k))
    offset = np.empty((n, k))
    for g in range(0, n, 32):
        blk = W[:, g:g + 32]
        mn, mx = np.minimum(blk.min(1), 0), np.maximum(blk.max(1), 0)
        s = (mx - mn) / 15
        scale[g:g + 32], offset[g:g + 32] = s, -s * np.round(-mn / s)
    prob = bils.BILSProblem.from_gram(X @ X.T, W.T, 0, 15, scale=scale, offset=offset,
                                      damp=0.01, ordering="diag")
    for fn, kw in ((bils.babai, {}), (bils.klein, {"n_samples": 4, "rng": 2}),
                   (bils.kbest, {"beam_width": 4})):
        _assert_parity(fn(prob, backend="numpy", **kw), fn(prob, backend="numba", **kw),
                       fn.__name__)


def test_auto_picks_numba():
    R = np.eye(2)
    assert bils.babai(R, [0.2, 1.7], 0, 3).backend == "numba"


# ---------------------------------------------------------------- subprocess checks
_SCRIPT = r"""
import hashlib, json, numpy as np, bils
rng = np.random.default_rng(4)
n, k = 70, 97   # several tiles of right-hand sides, several panels
R = np.triu(rng.normal(0, 0.3, (n, n)), 1) + np.diag(rng.uniform(0.7, 2, n))
Y = R @ rng.uniform(-1, 8, (n, k))
S = rng.uniform(0.5, 1.5, (1, k))
out = {}
for name, f in [("babai", lambda: bils.babai(R, Y, 0, 7, scale=S, block_size=16, backend="numba")),
                ("klein", lambda: bils.klein(R, Y, 0, 7, scale=S, n_samples=3, rng=5, block_size=16,
                                             backend="numba")),
                ("kbest", lambda: bils.kbest(R, Y, 0, 7, scale=S, beam_width=4, backend="numba")),
                ("enumerate", lambda: bils.enumerate(R[:10, :10], Y[:10], 0, 7, max_nodes=500,
                                                     n_best=2, backend="numba"))]:
    r = f()
    h = hashlib.sha256(np.ascontiguousarray(r.x).tobytes() + np.ascontiguousarray(r.cost).tobytes())
    out[name] = h.hexdigest()
import numba
out["threads"] = numba.get_num_threads()
print(json.dumps(out))
"""


def _run(env_extra, script=_SCRIPT, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **env_extra)
    p = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_thread_count_does_not_change_results():
    one = _run({"NUMBA_NUM_THREADS": "1"})
    two = _run({"NUMBA_NUM_THREADS": "2"})
    assert one.pop("threads") == 1 and two.pop("threads") == 2
    assert one == two


_NOJIT = r"""
import json, warnings, numpy as np, bils
warnings.simplefilter("error")   # e.g. uint64 overflow warnings of the RNG port
rng = np.random.default_rng(0)
n, k = 6, 3
R = np.triu(rng.normal(0, 0.3, (n, n)), 1) + 2 * np.eye(n)
Y = R @ rng.uniform(0, 3, (n, k))
out = {}
for name, f, kw in [("babai", bils.babai, {"block_size": 4}),
                    ("klein", bils.klein, {"n_samples": 3, "rng": 1, "block_size": 4}),
                    ("kbest", bils.kbest, {"beam_width": 3}),
                    ("enumerate", bils.enumerate, {"n_best": 2})]:
    a = f(R, Y, 0, 3, backend="numpy", **kw)
    b = f(R, Y, 0, 3, backend="numba", **kw)
    out[name] = bool(np.array_equal(a.x, b.x) and np.allclose(a.cost, b.cost, rtol=1e-9))
print(json.dumps(out))
"""


def test_runs_without_jit():
    res = _run({"NUMBA_DISABLE_JIT": "1"}, script=_NOJIT)
    assert res == {"babai": True, "klein": True, "kbest": True, "enumerate": True}


def test_klein_panel_is_a_multiple_of_block_size():
    from bils._numba.klein import MIN_PANEL, klein_panel

    for bs in (1, 3, 128, 1000, MIN_PANEL, 3000):
        p = klein_panel(bs)
        assert p % bs == 0 and p >= MIN_PANEL and p - bs < max(MIN_PANEL, bs)


def test_kbest_empty_slots_across_steps(monkeypatch):
    """Empty beam slots (cost inf) that live through whole steps and panel boundaries: the
    top level's box holds 5 values (3 of K=8 slots stay empty), the next 39 levels one
    value each (the beam keeps its empty slots), then 3-bit boxes refill it. Exercises the
    four-at-a-time step rows over empty members and the branch-free parent scoring."""
    import bils._numba.kbest as nkb

    n = 100
    R, Y, lo, hi, scale, offset = _problem(n, 12, "full", seed=23)
    hi = np.full((n, 1), 7, dtype=np.int64)
    hi[n - 40:] = 0
    hi[n - 1] = 4
    prob = (R, Y, np.zeros((n, 1), dtype=np.int64), hi, scale, offset)
    ref = _solve(bils.kbest, prob, "numpy", beam_width=8)
    for panel in (40, 512):
        monkeypatch.setattr(nkb, "PANEL", panel)
        _assert_parity(ref, _solve(bils.kbest, prob, "numba", beam_width=8), f"panel={panel}")


@pytest.mark.parametrize("B", [1, 3, 4, 7, 8])
@pytest.mark.parametrize("ns", [16, 5])
def test_kbest_step_rows_against_rank1_updates(B, ns):
    """``_step_rows`` (coefficients read in place from ``RT[bot:top]``) equals one rank-1
    update per decided level, bitwise: member b's row is its ancestor's minus
    ``RT[top - 1 - r] * zst[b, r]`` for r = 0, 1, ... in that order. Empty members (cost
    inf) outside a block of four keep their rows untouched."""
    from bils._numba.kbest import _step_rows

    rng = np.random.default_rng(B * 100 + ns)
    m, top = 70, 60
    bot = top - ns
    RT = rng.standard_normal((m, m))
    Tb = rng.standard_normal((8, m))
    anc = rng.integers(0, B, 8).astype(np.int64)
    zst = rng.standard_normal((8, 16))
    pc = rng.uniform(0, 1, 8)
    pc[B - 1] = np.inf  # an empty member (in a block of four only when B % 4 == 0)
    zst[B - 1] = 0.0
    Tn = np.full((8, m), 7.0)
    _step_rows(Tn, Tb, anc, zst, pc, B, RT, top, bot)
    blocks = B // 4 * 4 if ns == 16 else 0
    for b in range(B):
        if pc[b] == np.inf and b >= blocks:
            np.testing.assert_array_equal(Tn[b], 7.0)
            continue
        t = Tb[anc[b], :bot].copy()
        for r in range(ns):
            t = t - RT[top - 1 - r, :bot] * zst[b, r]
        np.testing.assert_array_equal(Tn[b, :bot], t)
        np.testing.assert_array_equal(Tn[b, bot:], 7.0)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("w", [1, 255, 256, 700])
def test_kbest_products_split_over_threads(threads, w):
    """The panels' products (``_Products.matmul``: OpenBLAS held at one thread, column
    blocks of ``_PRODUCT_COLS`` over Python threads) are bitwise the same for any thread
    count, into a column-sliced ``out`` too, and equal ``np.matmul`` to rounding; OpenBLAS's
    thread count is back to its value after the block, also on an exception."""
    from bils._numba._blas import Products as _Products
    from bils._numba._blas import openblas_thread_apis as _openblas_thread_apis

    rng = np.random.default_rng(w)
    A = rng.standard_normal((37, 300))
    B = rng.standard_normal((300, w + 5))[:, 2: 2 + w]  # strided columns, as Zref[e:]
    before = [get() for get, _ in _openblas_thread_apis()]
    outs = []
    for t in (1, threads):
        out = np.full((40, w), np.nan)[:37]
        with _Products(t) as prod:
            assert all(get() == 1 for get, _ in prod.apis)
            prod.matmul(A, B, out)
        outs.append(out)
    np.testing.assert_array_equal(outs[1], outs[0])
    np.testing.assert_allclose(outs[1], np.matmul(A, B), rtol=1e-12, atol=1e-12)
    assert [get() for get, _ in _openblas_thread_apis()] == before
    with pytest.raises(RuntimeError), _Products(threads):
        raise RuntimeError("boom")
    assert [get() for get, _ in _openblas_thread_apis()] == before
    outer = _Products(threads).__enter__()  # overlapping calls (e.g. two dask threads)
    with _Products(threads):
        pass
    assert all(get() == 1 for get, _ in outer.apis)  # the inner exit keeps the outer's 1
    outer.__exit__(None, None, None)
    assert [get() for get, _ in _openblas_thread_apis()] == before


def test_kbest_path_storage_widths(monkeypatch):
    """Paths stored as int16 codes and parents (box and beam fit) or int64/int32: the same
    codes and costs bitwise; a box beyond int16 takes the wide storage and matches numpy."""
    import types

    import bils._numba.kbest as nkb

    R, Y, lo, hi, scale, offset = _problem(70, 20, "full", seed=31)
    prob = (R, Y, 0, 7, scale, offset)
    monkeypatch.setattr(nkb, "PANEL", 24)
    narrow = _solve(bils.kbest, prob, "numba", beam_width=5)
    monkeypatch.setattr(nkb, "_I16", types.SimpleNamespace(min=0, max=0))  # never fits
    wide = _solve(bils.kbest, prob, "numba", beam_width=5)
    np.testing.assert_array_equal(wide.x, narrow.x)
    np.testing.assert_array_equal(wide.cost, narrow.cost)
    monkeypatch.undo()
    R, Y, lo, hi, scale, offset = _problem(40, 6, "none", seed=37, box=(-40000, 40000))
    Y = Y * 3000.0  # codes beyond int16
    prob = (R, Y, -40000, 40000, None, None)
    ref = _solve(bils.kbest, prob, "numpy", beam_width=4)
    assert np.abs(ref.x).max() > np.iinfo(np.int16).max
    monkeypatch.setattr(nkb, "PANEL", 16)
    _assert_parity(ref, _solve(bils.kbest, prob, "numba", beam_width=4), "int64 paths")


@pytest.mark.parametrize("beam, children, box", [(1, None, (0, 7)), (3, None, (0, 7)), (8, 8, (0, 7)),
                                                 (8, 8, (0, 2)), (5, 3, (-2, 2)), (6, 2, (0, 1))])
@pytest.mark.parametrize("panel", [7, 512])
def test_kbest_crafted_ties(beam, children, box, panel, monkeypatch):
    """Exact ties everywhere: small integers in ``R`` (diagonal 2) and ``Y`` make every centre
    an integer or a half-integer (two children at equal distance) and many children's costs
    equal across parents, all in exact arithmetic, so the numba kernel's blocked targets
    equal the reference's and its selection must resolve every tie as the reference does:
    cost, then parent slot, then zig-zag rank (the rounded value first, the lower of two
    equidistant values first), the Babai child of the Babai parent kept. Also K = 1, K not
    a power of two, more slots than children (a 3-value box), 45 levels (a partial step of
    16) and 37 RHS (a ragged last scheduling chunk)."""
    import bils._numba.kbest as nkb

    rng = np.random.default_rng(beam * 10 + box[1])
    n, k = 45, 37
    R = np.triu(rng.integers(-1, 2, (n, n)).astype(float), 1) + 2 * np.eye(n)
    Y = rng.integers(-3, 12, (n, k)).astype(float)
    prob = (R, Y, box[0], box[1], None, None)
    kw = dict(beam_width=beam, n_children=children)
    ref = _solve(bils.kbest, prob, "numpy", **kw)
    monkeypatch.setattr(nkb, "PANEL", panel)
    got = _solve(bils.kbest, prob, "numba", **kw)
    np.testing.assert_array_equal(got.x, ref.x)
    np.testing.assert_array_equal(got.cost, ref.cost)
