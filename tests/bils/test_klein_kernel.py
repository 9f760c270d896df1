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
