"""Helpers of the numba Klein kernel (``bils._numba.klein``) against plain-Python oracles.

The whole kernel is compared with the numpy reference in ``test_numba_backend.py``
(``test_klein_parity``); here each row helper of the sampled sweep is checked bit for bit
against an obvious loop, on inputs that reach its branches.
"""

from __future__ import annotations

import numpy as np
import pytest

numba = pytest.importorskip("numba")
from bils._numba import klein as nbk  # noqa: E402


@pytest.mark.parametrize("w", [1, 7, 64, 130])
@pytest.mark.parametrize("p_diff", [0.0, 0.15, 1.0])
def test_record_row_equals_loop(w, p_diff):
    rng = np.random.default_rng(w * 100 + int(p_diff * 10))
    xb = rng.integers(0, 16, w)
    xrow = np.where(rng.random(w) < p_diff, (xb + rng.integers(1, 4, w)) % 16, xb).astype(np.float64)
    srow, orow = rng.uniform(0.1, 2.0, w), rng.normal(0, 1, w)
    trow, drow = rng.normal(0, 5, w), rng.uniform(0.5, 3.0, w)
    zq, cl = np.empty(w), rng.uniform(0, 1, w)
    xout = np.empty(w, dtype=np.int64)
    djj, dval = np.full(w, -1, dtype=np.int32), np.full(w, np.nan)
    cl_ref = cl.copy()
    nd = nbk._record_row(xrow, srow, orow, trow, drow, zq, cl, xout, xb, djj, dval)
    cols = [jj for jj in range(w) if int(xrow[jj]) != xb[jj]]
    assert nd == len(cols)
    np.testing.assert_array_equal(djj[:nd], cols)
    np.testing.assert_array_equal(dval[:nd], [srow[j] * float(int(xrow[j]) - xb[j]) for j in cols])
    np.testing.assert_array_equal(xout, xrow.astype(np.int64))
    np.testing.assert_array_equal(zq, srow * xrow + orow)
    for jj in range(w):
        e = trow[jj] - drow[jj] * xrow[jj]
        cl_ref[jj] += e * e
    np.testing.assert_array_equal(cl, cl_ref)


def _corrections_loop(CT, RS, e, nlev, t, j0, dcnt, djj, dval):
    """The plain loop that ``_corrections`` regroups: levels ascending, one update per difference."""
    for lv in range(e, nlev):
        for q in range(dcnt[lv, t]):
            jj, dv = djj[lv, j0 + q], dval[lv, j0 + q]
            CT[jj] = CT[jj] + RS[lv - e] * dv


@pytest.mark.parametrize("pad", [0, nbk.CT_PAD])
@pytest.mark.parametrize("m, nlev_above, w, p_diff", [(5, 0, 3, 0.5), (16, 70, 9, 0.15),
                                                     (33, 200, 40, 0.6), (8, 130, 64, 1.0)])
def test_corrections_equal_the_plain_loop(m, nlev_above, w, p_diff, pad):
    """Bitwise: every element gets its products in ascending level order (blocks of
    CORR_LEVELS levels, 4/2/1 differences per pass, columns with 0 to many differences);
    with padded rows (``pad``) only the first ``m`` elements of a row are touched."""
    rng = np.random.default_rng(m + nlev_above + w)
    e = 10 + m  # the panel [10, e) sits below the levels [e, nlev)
    nlev = e + nlev_above
    ntiles, t, j0 = 3, 1, w  # the middle tile of three
    k = ntiles * w
    RS = rng.normal(0, 1, (nlev - e, m))
    dcnt = np.zeros((nlev, ntiles), dtype=np.int32)
    djj = np.full((nlev, k), -1, dtype=np.int32)
    dval = np.full((nlev, k), np.nan)
    for lv in range(e, nlev):
        cols = np.flatnonzero(rng.random(w) < p_diff)
        dcnt[lv, t] = len(cols)
        djj[lv, j0:j0 + len(cols)] = cols
        dval[lv, j0:j0 + len(cols)] = rng.normal(0, 3, len(cols)) * 10.0 ** rng.integers(-8, 8, len(cols))
    CT = np.zeros((w, m + pad))
    CT[:, m:] = np.nan
    ref = np.zeros((w, m))
    nbk._corrections(CT, RS, e, nlev, t, j0, dcnt, djj, dval)
    _corrections_loop(ref, RS, e, nlev, t, j0, dcnt, djj, dval)
    np.testing.assert_array_equal(CT[:, :m], ref)
    assert np.isnan(CT[:, m:]).all()


def test_wide_tiles_equal_narrow_tiles_and_the_reference(monkeypatch):
    """Many 256-wide sampled-sweep tiles (a ragged last one), several panels with
    corrections: bitwise equal to 32-wide tiles, and equal to the numpy reference."""
    import bils

    rng = np.random.default_rng(5)
    n, k = 40, 2100
    R = np.triu(rng.normal(0, 0.4, (n, n)), 1) + np.diag(rng.uniform(0.6, 2.0, n))
    S = rng.uniform(0.3, 1.5, (n, 1))
    Y = R @ (S * rng.uniform(-1, 8, (n, k))) + rng.normal(0, 0.05, (n, k))
    monkeypatch.setattr(nbk, "MIN_PANEL", 16)
    kw = dict(scale=S, n_samples=4, tau=0.5, rng=3, block_size=16)
    assert nbk._sample_width(k) == nbk.SAMPLE_TILE == 256
    wide = bils.klein(R, Y, 0, 7, backend="numba", **kw)
    monkeypatch.setattr(nbk, "SAMPLE_TILE", 32)
    narrow = bils.klein(R, Y, 0, 7, backend="numba", **kw)
    np.testing.assert_array_equal(wide.x, narrow.x)
    np.testing.assert_array_equal(wide.cost, narrow.cost)
    np.testing.assert_array_equal(wide.info["improved"], narrow.info["improved"])
    ref = bils.klein(R, Y, 0, 7, backend="numpy", **kw)
    assert np.mean(ref.x == wide.x) >= 0.999
    np.testing.assert_allclose(wide.cost, ref.cost, rtol=1e-9)
    assert wide.info["improved"].any()


def test_packed_panels_are_the_transposed_blocks():
    """Panel ``p``'s block in the packed buffer is ``R[a:e, a:].T`` (ragged last panel too)."""
    from bils._numba.babai import panels

    rng = np.random.default_rng(2)
    n = 37
    R = np.triu(rng.normal(0, 1, (n, n)))
    bounds = panels(n, 16)
    RP, poff = nbk._packed_panels(R, bounds)
    assert not RP.flags.writeable
    for (a, e), off in zip(bounds, poff):
        blk = RP[off:off + (n - a) * (e - a)].reshape(n - a, e - a)
        np.testing.assert_array_equal(blk, R[a:e, a:].T)
    assert RP.size == poff[-1] + n * (bounds[-1][1] - bounds[-1][0])


def test_babai_sweep_with_shared_blocks_and_wide_tiles_is_unchanged():
    """``sweep(RTs=, width=)`` (Klein's Babai sweep) equals the sweep that makes its own
    transposed blocks with the default tile width, and ``sweep(products=)`` (the products
    in column blocks, OpenBLAS held at one thread) the threaded products: codes, points,
    costs and kept products."""
    import bils
    from bils._numba.babai import panels, sweep

    rng = np.random.default_rng(3)
    n, k = 45, 300
    R = np.triu(rng.normal(0, 0.4, (n, n)), 1) + np.diag(rng.uniform(0.6, 2.0, n))
    Y = R @ rng.uniform(-1, 8, (n, k))
    can = bils.BILSProblem.from_triangular(R, Y, 0, 7).canonical()
    bounds = panels(n, 16)
    RP, poff = nbk._packed_panels(can.R, bounds)
    RTs = [RP[off:off + (n - a) * (e - a)].reshape(n - a, e - a)[: e - a]
           for (a, e), off in zip(bounds, poff)]
    from bils._numba._blas import Products

    outs = []
    for kw in ({}, {"RTs": RTs, "width": 128}, {"RTs": RTs, "width": 7}, {"products": 2}, {"products": 1}):
        x, Z, c, G = np.empty((n, k), dtype=np.int64), np.empty((n, k)), np.empty(k), np.empty((n, k))
        if "products" in kw:  # the panels' products in column blocks over 2 / 1 Python threads
            with Products(kw["products"], cols=128) as prod:
                sweep(can, 16, x, Z, c, G_out=G, products=prod)
        else:
            sweep(can, 16, x, Z, c, G_out=G, **kw)
        outs.append((x, Z, c, G))
    for other in outs[1:]:
        for u, v in zip(outs[0], other):
            np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("bounds", ["scalar", "per_level"])
def test_one_launch_over_tiles_equals_the_serial_tiles(monkeypatch, bounds):
    """The sampled sweeps in one parallel launch (dynamic tiles, per-thread scratch, the
    selection fused per tile) equal the serial loop over tiles bit for bit, on many
    tiles (a ragged last one) and panels (a ragged last one); and the numpy reference."""
    import bils

    rng = np.random.default_rng(11)
    n, k = 50, 700
    R = np.triu(rng.normal(0, 0.4, (n, n)), 1) + np.diag(rng.uniform(0.4, 2.0, n))
    S = rng.uniform(0.3, 1.5, (n, 1))
    Y = R @ (S * rng.uniform(-1, 8, (n, k))) + rng.normal(0, 0.3, (n, k))
    lo, hi = (0, 7) if bounds == "scalar" else (rng.integers(-2, 1, (n, 1)), rng.integers(3, 9, (1, k)))
    monkeypatch.setattr(nbk, "MIN_PANEL", 16)
    kw = dict(scale=S, n_samples=5, tau=0.7, rng=4, block_size=16)
    assert (k + nbk._sample_width(k) - 1) // nbk._sample_width(k) >= 8
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        par = bils.klein(R, Y, lo, hi, backend="numba", **kw)
        numba.set_num_threads(1)
        one = bils.klein(R, Y, lo, hi, backend="numba", **kw)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(par.x, one.x)
    np.testing.assert_array_equal(par.cost, one.cost)
    np.testing.assert_array_equal(par.info["improved"], one.info["improved"])
    assert par.info["improved"].any() and not par.info["improved"].all()
    ref = bils.klein(R, Y, lo, hi, backend="numpy", **kw)
    assert np.mean(ref.x == par.x) >= 0.999
    np.testing.assert_allclose(par.cost, ref.cost, rtol=1e-9)
    np.testing.assert_array_equal(par.info["improved"], ref.info["improved"])


@pytest.mark.parametrize("min_panel, block_size", [(16, 16), (16, 5), (1024, 128)])
def test_samples_equal_to_babai_never_improve(monkeypatch, min_panel, block_size):
    """A temperature so small that every draw is the rounded centre: every sample is the
    Babai point, and must have bitwise its cost (the Babai pass keeps the targets at each
    panel start and sums its cost per panel, as the samples do), so nothing is
    ``improved``; over panels that are and are not multiples of the 16-level steps, and
    one panel. Then a usual temperature improves some columns, never worsens any."""
    import bils

    rng = np.random.default_rng(8)
    n, k = 60, 300
    R = np.triu(rng.normal(0, 0.4, (n, n)), 1) + np.diag(rng.uniform(0.4, 2.0, n))
    S = rng.uniform(0.3, 1.5, (n, 1))
    Y = R @ (S * rng.uniform(-1, 8, (n, k))) + rng.normal(0, 0.3, (n, k))
    monkeypatch.setattr(nbk, "MIN_PANEL", min_panel)
    babai = bils.babai(R, Y, 0, 7, scale=S, backend="numba")
    cold = bils.klein(R, Y, 0, 7, scale=S, n_samples=3, tau=1e-30, rng=1, block_size=block_size,
                      backend="numba")
    assert not cold.info["improved"].any()
    np.testing.assert_array_equal(cold.x, babai.x)
    np.testing.assert_allclose(cold.cost, babai.cost, rtol=1e-12)
    warm = bils.klein(R, Y, 0, 7, scale=S, n_samples=3, tau=0.5, rng=1, block_size=block_size,
                      backend="numba")
    better = warm.info["improved"]
    assert better.any()
    np.testing.assert_array_equal(warm.x[:, ~better], babai.x[:, ~better])
    assert np.all(warm.cost[better] < cold.cost[better])
