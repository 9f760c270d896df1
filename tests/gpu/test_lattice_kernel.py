"""glvq decode-GEMV kernel on the GPU against the CPU oracle (``make gpu-check``).

Skipped without CuPy and a CUDA device, so the CPU suite is unaffected. Not yet run on a
GPU (no device was lent to the sessions that wrote it): the first GPU session runs it.
"""

import numpy as np
import pytest

cp = pytest.importorskip("cupy")
try:
    _N_DEV = cp.cuda.runtime.getDeviceCount()
except Exception:  # no driver / no device
    _N_DEV = 0
pytestmark = pytest.mark.skipif(_N_DEV == 0, reason="no CUDA device")

from llm_adapter import _lattice_kernel as lk  # noqa: E402
from llm_adapter.methods.glvq import GLVQSpec, quantize_weight_glvq  # noqa: E402


def _layer(out, n, seed):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((out, n)) * np.exp(rng.normal(0, 0.5, (out, 1)))
    X = rng.standard_normal((n, 4 * n))
    return W, X @ X.T / X.shape[1]


@pytest.mark.parametrize("bits", lk.KERNEL_BITS)
@pytest.mark.parametrize("col_scale", [False, True])
@pytest.mark.parametrize("shape, batch", [((40, 96), 1), ((130, 256), 3), ((7, 64), 17)])
def test_kernel_matches_cpu_oracle(bits, col_scale, shape, batch, monkeypatch):
    # small launches so the grids have several blocks and partial warps/blocks at the edges
    monkeypatch.setitem(lk.LAUNCH, "transform_threads", 64)
    monkeypatch.setitem(lk.LAUNCH, "gemv_warps_per_block", 2)
    W, H = _layer(*shape, seed=bits + 10 * batch)
    q = quantize_weight_glvq(W, H, spec=GLVQSpec(bits=bits, d=8, group_size=32, n_iter=1, col_scale=col_scale,
                                                  encode="nearest_plane", fit_encode=None),
                             backend="numpy", bias=np.linspace(-1, 1, shape[0]))
    packed = lk.pack_lattice_layer(q)
    dev = {k: cp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in packed.items()}
    x = np.random.default_rng(1).standard_normal((batch, shape[1])).astype(np.float32)
    y = cp.asnumpy(lk.lattice_matmul_cuda(cp.asarray(x), dev))
    ref = x.astype(np.float64) @ q.dequantize(np.float64).T + q.bias
    scale = np.abs(x).sum(axis=1, keepdims=True) * np.abs(q.dequantize(np.float64)).max()
    assert y.shape == ref.shape and y.dtype == np.float32
    np.testing.assert_array_less(np.abs(y - ref), 1e-5 * scale + 1e-6)
