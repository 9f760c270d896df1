"""The inference kernels on a real GPU against the CPU oracle (``make gpu-check``).

Marker ``device``: skipped without a CUDA device. ``LatticeLinear`` (glvq decode-GEMM) and
``QuantLinear`` (W2/3/4) on CUDA tensors run the numba-cuda kernels through the torch ops
(no dequantized weight is cached) and must match their CPU forward (dequantize, then
matmul); the same inside a captured CUDA graph and with bfloat16 activations; and the
public functions on CuPy arrays. Not yet run on a GPU (none was lent to the sessions that
wrote it): the first GPU session runs it.
"""

from __future__ import annotations

import numpy as np
import pytest

from llm_adapter import kernels as K

pytestmark = pytest.mark.device

torch = pytest.importorskip("torch")


def _glvq_layer(out, n, seed, bits=2, d=8, col_scale=True):
    from llm_adapter.methods.glvq import GLVQSpec, quantize_weight_glvq

    rng = np.random.default_rng(seed)
    W = rng.standard_normal((out, n)) * np.exp(rng.normal(0, 0.5, (out, 1)))
    X = rng.standard_normal((n, 4 * n))
    spec = GLVQSpec(bits=bits, d=d, group_size=32, n_iter=1, col_scale=col_scale, encode="nearest_plane",
                    fit_encode=None)
    return quantize_weight_glvq(W, X @ X.T / X.shape[1], spec=spec, backend="numpy", bias=np.linspace(-1, 1, out))


def _quant_layer(out, n, bits, group_size, act_order, seed):
    from llm_adapter.methods.uniform import QuantizedLayer

    rng = np.random.default_rng(seed)
    gs = n if group_size == -1 else group_size
    g_idx = (np.arange(n) // gs).astype(np.int32)
    if act_order:
        g_idx = g_idx[rng.permutation(n)]
    ng = -(-n // gs)
    return QuantizedLayer(codes=rng.integers(0, 1 << bits, (out, n)).astype(np.uint8),
                          scales=rng.uniform(0.01, 0.05, (out, ng)).astype(np.float32),
                          zeros=rng.integers(0, 1 << bits, (out, ng)).astype(np.float32), g_idx=g_idx, bits=bits,
                          group_size=group_size, bias=rng.standard_normal(out).astype(np.float32))


def _close(y, ref, x, w):
    scale = x.abs().double() @ w.abs().double().T
    assert y.shape == ref.shape
    assert bool(((y.double() - ref.double()).abs() <= 2e-3 * scale + 1e-2).all())


@pytest.mark.parametrize("d", [2, 4, 8])
@pytest.mark.parametrize("shape, batch", [((40, 96), 1), ((130, 256), 3), ((7, 64), 16), ((64, 1024), 1)])
def test_lattice_linear_on_cuda_matches_cpu(d, shape, batch):
    from llm_adapter.nn import LatticeLinear

    q = _glvq_layer(*shape, seed=d + batch, d=d)
    m = LatticeLinear(q)
    x = torch.randn(batch, shape[1], generator=torch.Generator().manual_seed(1))
    ref = m(x)  # CPU: dequantize, then matmul
    mc = m.to("cuda").half()
    y = mc(x.half().cuda())
    assert mc._cache is None  # no dequantized weight on the device
    _close(y.float().cpu(), ref, x, torch.from_numpy(q.dequantize()))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size, act_order", [(128, False), (32, True), (-1, False)])
@pytest.mark.parametrize("batch", [1, 5, 16, 40])
def test_quant_linear_on_cuda_matches_cpu(bits, group_size, act_order, batch):
    from llm_adapter.nn import QuantLinear

    q = _quant_layer(96, 4096 if batch == 1 else 256, bits, group_size, act_order, seed=bits + batch)
    m = QuantLinear.from_quantized(q)
    x = torch.randn(batch, q.shape[1], generator=torch.Generator().manual_seed(2))
    ref = m(x)
    mc = m.to("cuda")
    y = mc(x.half().cuda())
    assert mc._cache is None
    assert y.dtype == torch.float16
    _close(y.float().cpu(), ref, x, m.dequantize().cpu())


def test_bfloat16_and_cuda_graph_replay():
    from llm_adapter.nn import LatticeLinear, QuantLinear

    qm = QuantLinear.from_quantized(_quant_layer(256, 4096, 4, 128, False, seed=0)).cuda()
    lm = LatticeLinear(_glvq_layer(64, 256, seed=0)).cuda()
    x = torch.randn(2, 4096, device="cuda", dtype=torch.bfloat16)
    ref = (x.float() @ qm.dequantize().cuda().T + qm.bias.cuda()).bfloat16()
    torch.testing.assert_close(qm(x), ref, rtol=2e-2, atol=2e-1)

    static_x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)

    def step():
        return lm(torch.relu(qm(static_x))[:, :256])

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        eager = step()  # warm-up: compiles the kernels
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for seed in range(3):
        static_x.copy_(torch.randn(1, 4096, generator=torch.Generator().manual_seed(seed)).half())
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, step(), rtol=0, atol=0)
    assert eager.shape == out.shape
    torch.cuda.synchronize()
    for buf, _ in K._COUNTERS.values():  # every split-K kernel left its counters at zero
        assert int(buf.sum()) == 0


def test_public_functions_on_cupy_arrays(monkeypatch):
    cp = pytest.importorskip("cupy")
    from llm_adapter.formats.packing import pack

    monkeypatch.setitem(K.LAUNCH, 4, {"tx": 32, "ty": 2, "kv": 64})  # a split-K grid on a small layer
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 8, (320, 48))
    scales = rng.uniform(0.01, 0.05, (10, 48)).astype(np.float16)
    zeros = rng.integers(0, 8, (10, 48)).astype(np.float16)
    x = rng.standard_normal((3, 320)).astype(np.float16)
    y = K.quant_matmul(cp.asarray(x), cp.asarray(pack(codes, 3, axis=0)), cp.asarray(scales), cp.asarray(zeros), None,
                       3, 32, 320)
    g = np.arange(320) // 32
    w = scales[g].astype(np.float64) * (codes - zeros[g])
    ref = x.astype(np.float64) @ w
    assert isinstance(y, cp.ndarray) and y.dtype == np.float16
    np.testing.assert_array_less(np.abs(cp.asnumpy(y) - ref), 2e-3 * (np.abs(x) @ np.abs(w)) + 1e-2)
    q = _glvq_layer(40, 96, seed=5)
    p = K.pack_lattice_layer(q)
    dev = {k: cp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in p.items()}
    xl = rng.standard_normal((2, 96)).astype(np.float32)
    yl = K.lattice_matmul(cp.asarray(xl), dev["qweight_t"], dev["generators"], dev["centre"], dev["row_scale"],
                          dev["col_scale"], dev["bias"], bits=p["bits"], d=p["d"], group_size=p["group_size"],
                          in_features=96)
    np.testing.assert_allclose(cp.asnumpy(yl), K.lattice_matmul_reference(xl, p), rtol=1e-4, atol=1e-3)
