"""The torch custom ops of llm_adapter.kernels on the CPU: implementations, fake tensors,
torch.compile tracing, registration of the CUDA kernels, memory accounting.

Runs in the ordinary process (skipped in the simulator's, where it would only repeat).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.gpu.conftest import SIMULATOR

from llm_adapter.formats.packing import pack
from llm_adapter.kernels import torch_ops
from llm_adapter.methods.glvq import GLVQSpec, quantize_weight_glvq
from llm_adapter.nn import LatticeLinear, QuantLinear, has_cuda_kernel, quant_matmul
from llm_adapter.methods.uniform import QuantizedLayer

pytestmark = pytest.mark.skipif(SIMULATOR, reason="CPU op tests run in the ordinary process")


def _quant_layer(rng, out_f, in_f, bits, group_size, act_order):
    gs = in_f if group_size == -1 else group_size
    n_groups = -(-in_f // gs)
    g_idx = (np.arange(in_f) // gs).astype(np.int32)
    if act_order:
        g_idx = g_idx[rng.permutation(in_f)]
    return QuantizedLayer(codes=rng.integers(0, 1 << bits, (out_f, in_f)).astype(np.uint8),
                          scales=rng.uniform(1e-3, 0.2, (out_f, n_groups)).astype(np.float16).astype(np.float32),
                          zeros=rng.integers(0, 1 << bits, (out_f, n_groups)).astype(np.float32),
                          g_idx=g_idx, bits=bits, group_size=group_size,
                          bias=rng.standard_normal(out_f).astype(np.float32))


def _glvq(d=4, bits=2, n_in=64, n_out=12, col_scale=True, salience_frac=0.0, mu=None, seed=0):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n_out, n_in))
    X = rng.standard_normal((n_in, 3 * n_in))
    spec = GLVQSpec(bits=bits, d=d, group_size=32, n_iter=1, col_scale=col_scale, salience_frac=salience_frac, mu=mu,
                    encode="nearest_plane", fit_encode=None)
    return quantize_weight_glvq(W, X @ X.T, spec=spec, backend="numpy", bias=np.linspace(-1, 1, n_out))


def _lattice_args(m, x):
    return (x, m.qweight, m.generators, m.group_bits, m.row_scale, m.col_scale, m.bias, m.pack_bits, m.d,
            m.group_size, m.in_features, m.offset)


def test_cuda_kernels_are_registered():
    assert torch_ops.CUDA_REGISTERED  # numba-cuda is installed in the test environment
    assert has_cuda_kernel()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("llm_adapter::lattice_matmul", "CUDA")


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_quant_matmul_cpu_is_dequantize_then_matmul(bits, act_order):
    rng = np.random.default_rng(bits + 10 * act_order)
    layer = _quant_layer(rng, 24, 96, bits, 32, act_order)
    m = QuantLinear.from_quantized(layer)
    x = torch.from_numpy(rng.standard_normal((2, 3, 96)).astype(np.float32))
    expected = x.double() @ torch.from_numpy(layer.dequantize(np.float64)).T + torch.from_numpy(layer.bias).double()
    y = quant_matmul(x, m.qweight, m.scales, m.zeros, m.g_idx, m.bias, bits, 32, 96)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d", [2, 4, 8])
def test_lattice_matmul_cpu_is_dequantize_then_matmul(d):
    q = _glvq(d=d, col_scale=d != 2, seed=d)
    m = LatticeLinear(q)
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(d))
    y = torch_ops.lattice_matmul(*_lattice_args(m, x))
    expected = x.double() @ torch.from_numpy(q.dequantize(np.float64)).T + torch.from_numpy(q.bias)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, m(x))  # the module's CPU path (cached dequantized weight)


def test_lattice_decode_in_torch_handles_mixed_bits_and_matches_the_layer():
    q = _glvq(salience_frac=0.5, seed=3)
    assert len(set(q.group_bits.tolist())) == 2
    m = LatticeLinear(q)
    w = torch_ops.dequantize_lattice_torch(m.qweight, m.generators, m.group_bits, m.row_scale, m.col_scale,
                                           m.pack_bits, m.d, m.group_size, m.in_features, m.offset)
    np.testing.assert_allclose(w.numpy(), q.dequantize(np.float64), rtol=1e-5, atol=1e-6)


def test_opcheck_lattice_matmul():
    m = LatticeLinear(_glvq())
    torch.library.opcheck(torch_ops.lattice_matmul, _lattice_args(m, torch.randn(3, 64)))


def test_fake_implementations_give_the_output_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    rng = np.random.default_rng(0)
    qm = QuantLinear.from_quantized(_quant_layer(rng, 24, 96, 3, 32, True))
    lm = LatticeLinear(_glvq())
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(2, 5, 96, dtype=torch.float16)
        y = torch.ops.llm_adapter.quant_matmul(x, qm.qweight, qm.scales, qm.zeros, qm.g_idx, qm.bias, 3, 32, 96)
        assert tuple(y.shape) == (2, 5, 24) and y.dtype == torch.float16
        x = torch.empty(7, 64, dtype=torch.bfloat16)
        y = torch.ops.llm_adapter.lattice_matmul(*_lattice_args(lm, x))
        assert tuple(y.shape) == (7, 12) and y.dtype == torch.bfloat16


def test_torch_compile_traces_both_ops_in_one_graph():
    rng = np.random.default_rng(1)
    qm = QuantLinear.from_quantized(_quant_layer(rng, 64, 96, 4, 32, False))
    lm = LatticeLinear(_glvq(n_out=16))

    def f(x):
        h = torch.ops.llm_adapter.quant_matmul(x, qm.qweight, qm.scales, qm.zeros, qm.g_idx, qm.bias, 4, 32, 96)
        return torch_ops.lattice_linear(lm, torch.relu(h))

    x = torch.randn(3, 96)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x))


def test_companded_layers_stay_on_the_dequantized_path():
    q = _glvq(mu=20.0)
    m = LatticeLinear(q)
    assert not torch_ops.lattice_supported(m)
    assert torch_ops.lattice_supported(LatticeLinear(_glvq()))


def test_model_memory_counts_packed_layers_against_fp16():
    rng = np.random.default_rng(2)
    qm = QuantLinear.from_quantized(_quant_layer(rng, 64, 128, 4, 32, False))
    model = torch.nn.Sequential(qm, torch.nn.Linear(64, 8, bias=False))
    mem = torch_ops.model_memory(model)
    packed = 16 * 64 * 4 + 2 * (4 * 64 * 2) + 64 * 4  # qweight int32, fp16 scales + zeros, fp32 bias
    assert mem["bytes"] == packed + 64 * 8 * 4
    assert mem["fp16_bytes"] == 2 * 64 * 128 + 2 * 64 + 2 * 64 * 8
    assert mem["ratio"] == pytest.approx(mem["bytes"] / mem["fp16_bytes"])


def test_public_functions_refuse_numpy_outside_the_simulator():
    from llm_adapter.kernels import quant_matmul as kernel_quant_matmul

    qw = pack(np.zeros((32, 4), np.int64), 4, axis=0)
    with pytest.raises(ValueError, match="numpy arrays run only in numba-cuda's simulator"):
        kernel_quant_matmul(np.ones((1, 32), np.float16), qw, np.ones((1, 4), np.float16),
                            np.zeros((1, 4), np.float16), None, 4, -1, 32)
    with pytest.raises(ValueError, match="CPU torch tensor"):
        kernel_quant_matmul(torch.ones(1, 32), torch.from_numpy(qw), torch.ones(1, 4), torch.zeros(1, 4), None, 4,
                            -1, 32)
