"""The numba Babai's whole-sweep method: same result as the panel method, the numpy
reference and any tile width (per-RHS operations do not depend on the tiling)."""

from __future__ import annotations

import numpy as np
import pytest

import bils
from bils._validate import problem_iv

nbb = pytest.importorskip("bils._numba.babai")


def _case(n, k, seed, grouped):
    rng = np.random.default_rng(seed)
    R = np.triu(rng.normal(0, 0.3, (n, n)), 1) + np.diag(rng.uniform(1.0, 2.0, n))
    groups = np.arange(n) // 5
    g = groups[-1] + 1
    S = bils.GroupedGrid(rng.uniform(0.5, 1.5, (g, k)), groups)
    O = bils.GroupedGrid(rng.uniform(-3, 0, (g, k)), groups)
    x = rng.integers(0, 8, (n, k))
    Y = R @ (S.dense() * (x + rng.uniform(-0.3, 0.3, (n, k))) + O.dense())
    if not grouped:
        S, O = S.dense(), O.dense()
    return problem_iv(R, Y, 0, 7, S, O)


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("n, k", [(1, 1), (17, 3), (45, 70), (300, 129)])
def test_whole_equals_panels_and_numpy(precision, grouped, n, k, monkeypatch):
    can = _case(n, k, seed=n + 7 * k, grouped=grouped)
    x, cost, _, info = nbb.babai_kernel(can, block_size=8, precision=precision)
    monkeypatch.setattr(nbb, "MIN_PANEL", 16)  # several panels and BLAS products
    xp, costp, _, _ = nbb.babai_kernel(can, block_size=8, precision=precision, panels=True)
    from bils.babai import _babai_numpy

    xr, costr, _, _ = _babai_numpy(can, block_size=8, precision=precision)
    np.testing.assert_array_equal(x, xp)
    np.testing.assert_array_equal(x, xr)
    rtol = 1e-5 if precision == "float32" else 1e-12
    np.testing.assert_allclose(cost, costp, rtol=rtol)
    np.testing.assert_allclose(cost, costr, rtol=rtol)


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_whole_sweep_bitwise_independent_of_tile_width(precision, monkeypatch):
    can = _case(90, 200, seed=3, grouped=True)
    x1, c1, _, _ = nbb.babai_kernel(can, block_size=128, precision=precision)
    monkeypatch.setattr(nbb, "TILE", 8)  # 8 or 16 RHS per task instead of 32 or 64
    x2, c2, _, _ = nbb.babai_kernel(can, block_size=128, precision=precision)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(c1, c2)


def test_timings_phases():
    can = _case(40, 9, seed=1, grouped=True)
    t = {}
    nbb.babai_kernel(can, block_size=128, timings=t)
    assert set(t) == {"assemble", "grid", "sweep"} and all(v >= 0 for v in t.values())
    t = {}
    nbb.babai_kernel(can, block_size=8, timings=t, panels=True)
    assert {"grid", "product", "panel", "convert", "assemble"} <= set(t)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows, cols", [(1, 1), (3, 5), (4096 // 64, 128)])
def test_aligned_empty_starts_on_a_cache_line(dtype, rows, cols):
    from numba import njit

    from bils._numba._common import ALIGN, aligned_empty

    @njit
    def addrs(rows, cols, proto):
        out = np.empty(8, dtype=np.int64)
        for t in range(8):  # several allocations: different allocator states
            a = aligned_empty(rows + t, cols, proto)
            a[:, :] = 1.0
            out[t] = a.ctypes.data % ALIGN if a.shape == (rows + t, cols) else -1
        return out

    np.testing.assert_array_equal(addrs(rows, cols, np.empty(0, dtype)), 0)
    a = aligned_empty.py_func(rows, cols, np.empty(0, dtype))  # the NUMBA_DISABLE_JIT path
    assert a.shape == (rows, cols) and a.dtype == dtype and a.flags.c_contiguous
    assert a.ctypes.data % ALIGN == 0


@pytest.mark.parametrize("panels", [False, True])
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_one_numba_thread_runs_the_tiles_in_the_calling_thread(precision, panels, monkeypatch):
    """With one numba thread (a dask worker's default) the tiles run one after another in
    the GIL-free serial kernel: bitwise the parallel launch's result."""
    import numba

    can = _case(90, 700, seed=5, grouped=True)
    if panels:
        monkeypatch.setattr(nbb, "MIN_PANEL", 16)
    x1, c1, _, _ = nbb.babai_kernel(can, block_size=32, precision=precision, panels=panels)
    calls = []
    for name in ("_whole_one", "_sweep_panel_one"):
        real = getattr(nbb, name)
        monkeypatch.setattr(nbb, name, lambda *a, _real=real, _n=name: calls.append(_n) or _real(*a))
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        x2, c2, _, _ = nbb.babai_kernel(can, block_size=32, precision=precision, panels=panels)
    finally:
        numba.set_num_threads(before)
    assert calls and set(calls) == {"_sweep_panel_one" if panels else "_whole_one"}
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(c1, c2)


def _plain_targets(can, x, stop=0):
    """``Y - R Z`` of the codes ``x``, one level at a time from the top down to level
    ``stop``: row ``q >= stop`` as level ``q`` is decided, rows below ``stop`` with every
    level ``>= stop`` subtracted (the plain loop the whole sweep's fused updates equal)."""
    R = np.asarray(can.R)
    n = R.shape[0]
    T = np.array(can.Y, dtype=np.float64)
    for q in range(n - 1, stop - 1, -1):
        z = can.scale.row(q) * x[q] + can.offset.row(q)
        T[:q] = T[:q] - R[:q, q, None] * z
    return T


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("n, k, panel", [(45, 70, 16), (45, 70, 21), (50, 130, 7), (33, 5, 40),
                                         (64, 3, 32)])
def test_whole_sweep_keeps_panel_targets(grouped, n, k, panel):
    """Klein's Babai pass (``whole_sweep(panel=, Yg=)``): the codes of the plain sweep;
    ``Yg[a:e]`` bitwise ``Y[a:e]`` minus the updates of the levels ``>= e`` one level at a
    time from the top; ``cost`` bitwise the squared residuals summed per panel (levels in
    decision order, panels added from the top). Panels that are and are not multiples of
    the 16-level steps, one and several tiles of RHS, a single panel (``panel >= n``)."""
    can = _case(n, k, seed=n + k + panel, grouped=grouped)
    x0, c0 = np.empty((n, k), dtype=np.int64), np.empty(k)
    nbb.whole_sweep(can, x0, c0, np.dtype(np.float64))
    x, cost = np.empty((n, k), dtype=np.int64), np.empty(k)
    Yg = np.full((max(0, n - panel), k), np.nan)
    nbb.whole_sweep(can, x, cost, np.dtype(np.float64), panel=panel, Yg=Yg)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_allclose(cost, c0, rtol=1e-12)
    T = _plain_targets(can, x)
    R = np.asarray(can.R)
    ref = np.zeros(k)
    for a, e in nbb.panels(n, panel):
        if e < n:  # the first panel starts from Y, nothing kept
            np.testing.assert_array_equal(Yg[a:e], _plain_targets(can, x, stop=e)[a:e])
        cl = np.zeros(k)
        for q in range(e - 1, a - 1, -1):
            s, o = can.scale.row(q), can.offset.row(q)
            r = (T[q] - R[q, q] * o) - (R[q, q] * s) * x[q]
            cl += r * r
        ref += cl
    np.testing.assert_array_equal(cost, ref)
    assert not np.isnan(Yg).any()


def test_whole_sweep_checks_kept_targets():
    can = _case(20, 3, seed=0, grouped=True)
    x, cost = np.empty((20, 3), dtype=np.int64), np.empty(3)
    for Yg in (None, np.empty((3, 3)), np.empty((16, 3), dtype=np.float32), np.empty((16, 4))):
        with pytest.raises(ValueError, match="`Yg` must be a"):
            nbb.whole_sweep(can, x, cost, np.dtype(np.float64), panel=4, Yg=Yg)
