"""The CUDA implementations of the torch ops, run in the simulator.

Marker ``kernel``. In the simulator the kernels take numpy arrays, so the public functions
are wrapped to take and return CPU tensors; what is tested is the op layer on top of them:
leading dimensions, bfloat16 through float32, bias, the large-batch fallback, the glvq
kernel layout (transposed codes, centres, row scales) and its cache.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.gpu.conftest import SIMULATOR

torch = pytest.importorskip("torch")

from llm_adapter import kernels as K  # noqa: E402
from llm_adapter.kernels import torch_ops  # noqa: E402
from llm_adapter.methods.glvq import GLVQSpec, quantize_weight_glvq  # noqa: E402
from llm_adapter.nn import LatticeLinear, QuantLinear  # noqa: E402
from llm_adapter.methods.uniform import QuantizedLayer  # noqa: E402

pytestmark = [pytest.mark.kernel,
              pytest.mark.skipif(not SIMULATOR, reason="wraps the kernels for CPU tensors: simulator only")]


def _via_numpy(fn):
    def conv(a):
        return a.numpy() if isinstance(a, torch.Tensor) else a

    def wrapper(x, *args, **kwargs):
        y = fn(conv(x), *[conv(a) for a in args], **{k: conv(v) for k, v in kwargs.items()})
        return torch.from_numpy(y)

    return wrapper


@pytest.fixture(autouse=True)
def cpu_tensors_through_the_simulator(monkeypatch):
    monkeypatch.setattr(K, "quant_matmul", _via_numpy(K.quant_matmul))
    monkeypatch.setattr(K, "lattice_matmul", _via_numpy(K.lattice_matmul))
    for nb in K.LAUNCH:
        monkeypatch.setitem(K.LAUNCH, nb, {"tx": 16, "ty": 2, "kv": 64})
    monkeypatch.setitem(K.TRANSFORM_THREADS, "threads", 32)


def _quant_module(bits, act_order, seed=0, out_f=24, in_f=96):
    rng = np.random.default_rng(seed)
    g_idx = (np.arange(in_f) // 32).astype(np.int32)
    if act_order:
        g_idx = g_idx[rng.permutation(in_f)]
    layer = QuantizedLayer(codes=rng.integers(0, 1 << bits, (out_f, in_f)).astype(np.uint8),
                           scales=rng.uniform(0.01, 0.05, (out_f, 3)).astype(np.float32),
                           zeros=rng.integers(0, 1 << bits, (out_f, 3)).astype(np.float32), g_idx=g_idx, bits=bits,
                           group_size=32, bias=rng.standard_normal(out_f).astype(np.float32))
    return QuantLinear.from_quantized(layer)


def _args(m):
    return (m.qweight, m.scales, m.zeros, m.g_idx, m.bias, m.bits, m.group_size, m.in_features)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("act_order", [False, True])
def test_quant_matmul_cuda_impl(dtype, act_order):
    m = _quant_module(3, act_order)
    x = torch.randn(2, 3, 96, generator=torch.Generator().manual_seed(0)).to(dtype)
    y = torch_ops._quant_matmul_cuda(x, *_args(m))
    assert y.dtype == dtype and tuple(y.shape) == (2, 3, 24)
    ref = x.double() @ m.dequantize(torch.float64).T + m.bias.double()
    tol = 3e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_act_order_weights_are_repacked_once_into_static_groups():
    m = _quant_module(4, True, seed=3)
    layout = torch_ops._act_order_layout(m.qweight, m.g_idx, 4, 32, 96)
    assert layout is not None
    packed, perm = layout
    assert torch.equal(m.g_idx[perm].long(), torch.arange(96) // 32)
    assert torch_ops._act_order_layout(m.qweight, m.g_idx, 4, 32, 96) is layout  # cached
    x = torch.randn(2, 96)
    y = torch_ops._quant_matmul_cuda(x, *_args(m))
    torch.testing.assert_close(y, x @ m.dequantize().T + m.bias, rtol=2e-3, atol=2e-3)
    odd = m.g_idx.clone()
    odd[:3] = 0  # group counts no longer 32 each: no static layout, the per-value path runs
    assert torch_ops._act_order_layout(m.qweight, odd, 4, 32, 96) is None
    y = torch_ops._quant_matmul_cuda(x, m.qweight, m.scales, m.zeros, odd, m.bias, 4, 32, 96)
    g = odd.long()
    w = (m.scales.float()[g] * (m.dequantize().T / m.scales.float()[m.g_idx.long()] + m.zeros.float()[m.g_idx.long()]
                                - m.zeros.float()[g])).T
    torch.testing.assert_close(y, x @ w.T + m.bias, rtol=2e-3, atol=2e-3)


def test_quant_matmul_cuda_impl_large_batch_falls_back_to_dequantize():
    m = _quant_module(4, False)
    x = torch.randn(torch_ops.MAX_FUSED_BATCH + 1, 96)
    y = torch_ops._quant_matmul_cuda(x, *_args(m))
    torch.testing.assert_close(y, x @ m.dequantize().T + m.bias)


def _lattice_module(d, salience_frac=0.0):
    rng = np.random.default_rng(d)
    W = rng.standard_normal((20, 64))
    X = rng.standard_normal((64, 192))
    spec = GLVQSpec(bits=2, d=d, group_size=32, n_iter=1, col_scale=True, salience_frac=salience_frac,
                    encode="nearest_plane", fit_encode=None)
    q = quantize_weight_glvq(W, X @ X.T, spec=spec, backend="numpy", bias=np.linspace(-1, 1, 20))
    return LatticeLinear(q), q


@pytest.mark.parametrize("d, salience_frac", [(2, 0.0), (8, 0.0), (4, 0.5)])
def test_lattice_matmul_cuda_impl_and_layout_cache(d, salience_frac):
    m, q = _lattice_module(d, salience_frac)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)).half()
    args = (m.qweight, m.generators, m.group_bits, m.row_scale, m.col_scale, m.bias, m.pack_bits, m.d,
            m.group_size, m.in_features, m.offset)
    y = torch_ops._lattice_matmul_cuda(x, *args)
    ref = x.double() @ torch.from_numpy(q.dequantize(np.float64)).T + torch.from_numpy(q.bias)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.double(), ref, rtol=2e-3, atol=2e-3 * ref.abs().max().item())
    layout = torch_ops._LATTICE_CACHE[id(m.qweight)][3]
    assert tuple(layout[0].shape) == (m.qweight.shape[1], m.qweight.shape[0])  # transposed codes
    torch_ops._lattice_matmul_cuda(x, *args)
    assert torch_ops._LATTICE_CACHE[id(m.qweight)][3][0] is layout[0]  # reused
    with torch.no_grad():
        m.qweight.zero_()  # a new version: the layout is derived again
    torch_ops._lattice_matmul_cuda(x, *args)
    assert torch_ops._LATTICE_CACHE[id(m.qweight)][3][0] is not layout[0]
