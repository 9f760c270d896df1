"""Every CUDA solver kernel compiles to PTX for sm_80 and sm_90 (marker ``ptx``).

The host code of each solver runs in recording mode
(:func:`bils._cuda._common.record_launches`: numpy arrays, launches recorded instead of
run), so the kernels are compiled with the exact argument types their launches use, in
float32 and float64. ``numba.cuda.compile_ptx`` needs only the NVVM wheels (no GPU) and
catches the typing errors that the simulator (Python semantics) cannot.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.ptx

CCS = [(8, 0), (9, 0)]


def _launches():
    pytest.importorskip("numba.cuda")
    from bils._cuda._common import record_launches
    from bils._cuda.babai import babai_kernel
    from bils._cuda.enumerate import enumerate_kernel
    from bils._cuda.kbest import kbest_kernel
    from bils._cuda.klein import klein_kernel
    from bils._validate import problem_iv

    rng = np.random.default_rng(0)
    n, k = 9, 5
    R = np.triu(rng.standard_normal((n, n))) + 2 * np.eye(n)
    Y = rng.standard_normal((n, k))
    grid_cases = [problem_iv(R, Y, -2, 2),  # compact (1, 1) grids
                  problem_iv(R, Y, np.full((n, k), -2), 2, scale=rng.uniform(1, 2, (n, k)),
                             offset=rng.uniform(0, 1, (n, 1)))]  # dense / per-row grids
    with record_launches() as rec:
        for can in grid_cases:
            for precision in ("float64", "float32"):
                babai_kernel(can, block_size=4, precision=precision)
            klein_kernel(can, n_samples=2, tau=np.full(k, 0.5),
                         seeds=np.arange(k, dtype=np.uint64), block_size=4)
            kbest_kernel(can, beam_width=3, n_children=2)
            enumerate_kernel(can, max_nodes=-1, n_best=2)
    unique = {}
    for kern, sig in rec:
        unique.setdefault((id(kern), sig), (kern, sig))
    return list(unique.values())


def test_every_launch_is_recorded():
    launches = _launches()
    names = {kern.py_func.__qualname__.split(".")[0] for kern, _ in launches}
    assert {"sweep_kernel", "panel_kernel", "backtrack_kernel", "search_kernel"} <= names
    dtypes = {str(sig[1].dtype) for kern, sig in launches
              if kern.py_func.__qualname__.startswith("sweep_kernel")}
    assert dtypes == {"float32", "float64"}  # Babai in both precisions (G's dtype)


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
def test_kernels_compile_to_ptx(cc):
    from numba import cuda

    for kern, sig in _launches():
        ptx, resty = cuda.compile_ptx(kern.py_func, sig, cc=cc)
        assert ".entry" in ptx and f".target sm_{cc[0]}{cc[1]}" in ptx, kern.py_func.__qualname__
        assert str(resty) == "none"


def test_launch_grid_spreads_over_sms():
    """Few RHS: CUDA blocks shrink (down to a warp) so the grid reaches LAUNCH.min_blocks."""
    from bils._cuda._common import LAUNCH, blocks

    assert LAUNCH.min_blocks >= 132
    for k in (1, 5, 4096, 32768, 100_000, 10**6):
        grid, t = blocks(k)
        assert grid * t >= k and 32 <= t <= LAUNCH.threads and t % 32 == 0
        assert grid >= LAUNCH.min_blocks or t == 32
    assert blocks(4096) == (128, 32)
    assert blocks(10**6)[1] == LAUNCH.threads
