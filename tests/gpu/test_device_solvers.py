"""The cupy backend on a real GPU with device inputs (marker ``device``; ``make gpu-check``).

CuPy arrays and CUDA torch tensors go in, ``backend="auto"`` picks ``cupy``, results come
back as CuPy arrays equal to the numba backend's. Not yet run on a GPU (no device was lent
to the session that wrote it).
"""

from __future__ import annotations

import numpy as np
import pytest

import bils

pytestmark = pytest.mark.device


def _problem(n=40, k=300, seed=0):
    rng = np.random.default_rng(seed)
    R = np.triu(rng.standard_normal((n, n))) + 3 * np.eye(n)
    Y = rng.standard_normal((n, k)) * 6
    S = rng.uniform(0.5, 2.0, (n, k))
    return R, Y, S


@pytest.mark.parametrize("solver, kw", [("babai", {}), ("babai", {"precision": "float32"}),
                                        ("klein", {"n_samples": 4, "rng": 3}),
                                        ("kbest", {"beam_width": 8})])
def test_cupy_inputs_stay_on_device(solver, kw):
    cp = pytest.importorskip("cupy")
    R, Y, S = _problem()
    fn = getattr(bils, solver)
    res = fn(cp.asarray(R), cp.asarray(Y), 0, 15, scale=cp.asarray(S), **kw)
    assert res.backend == "cupy"
    assert isinstance(res.x, cp.ndarray) and isinstance(res.cost, cp.ndarray)
    ref = fn(R, Y, 0, 15, scale=S, backend="numba", **kw)
    match = np.mean(res.x.get() == ref.x)
    assert match >= (0.999 if kw.get("precision") == "float32" else 1.0)


def test_enumerate_and_torch_cuda_tensors():
    cp = pytest.importorskip("cupy")
    torch = pytest.importorskip("torch")
    R, Y, _ = _problem(n=12, k=1000)
    Rt = torch.from_numpy(R).cuda()
    Yt = torch.from_numpy(Y).cuda()
    res = bils.enumerate(Rt, Yt, -8, 7, n_best=2)
    assert res.backend == "cupy" and isinstance(res.x, cp.ndarray)
    ref = bils.enumerate(R, Y, -8, 7, n_best=2, backend="numba")
    assert np.array_equal(res.x.get(), ref.x)
    assert np.array_equal(res.info["nodes"].get(), ref.info["nodes"])


def test_lattice_encode_on_device():
    cp = pytest.importorskip("cupy")
    rng = np.random.default_rng(1)
    cb = bils.Codebook(np.triu(rng.standard_normal((8, 8))) * 0.2 + np.eye(8), bits=2)
    V = rng.standard_normal((16, 500))
    for method in ("round_off", "nearest_plane", "kbest", "exact"):
        g = bils.lattice.encode(cb, cp.asarray(V), method=method)
        c = bils.lattice.encode(cb, V, method=method, backend="numba")
        assert g.backend == "cupy" and np.mean(g.x.get() == c.x) == 1.0
