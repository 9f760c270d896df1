"""The inference kernels (llm_adapter.kernels) against dequantize-then-matmul.

Marker ``kernel``: numba-cuda's simulator runs them on numpy arrays (``make gpu-sim``); on a
CUDA device (``make gpu-check``) the same tests run on CuPy arrays when CuPy is installed.
Launch sizes are shrunk so that small shapes cross column-block, split-K, group and word
edges (3-bit values straddling words included), and batches cross tile edges.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.gpu.conftest import SIMULATOR

from llm_adapter import kernels as K
from llm_adapter.formats.packing import pack
from llm_adapter.methods.glvq import GLVQSpec, quantize_weight_glvq

pytestmark = pytest.mark.kernel

SMALL = {"tx": 16, "ty": 2, "kv": 64}


@pytest.fixture(autouse=True)
def small_launch(monkeypatch):
    for nb in K.LAUNCH:
        monkeypatch.setitem(K.LAUNCH, nb, dict(SMALL))
    monkeypatch.setitem(K.TRANSFORM_THREADS, "threads", 32)


def _to_device(a):
    """numpy in the simulator; CuPy on a device."""
    if a is None or SIMULATOR:
        return a
    cp = pytest.importorskip("cupy")
    return cp.asarray(a)


def _to_host(a):
    return a if isinstance(a, np.ndarray) else a.get()


def _uniform_layer(rng, bits, n_in, n_out, group_size, act_order):
    codes = rng.integers(0, 1 << bits, (n_in, n_out))
    n_groups = 1 if group_size == -1 else -(-n_in // group_size)
    scales = rng.uniform(0.01, 0.1, (n_groups, n_out)).astype(np.float16)
    zeros = rng.integers(0, 1 << bits, (n_groups, n_out)).astype(np.float16)
    gs = n_in if group_size == -1 else group_size
    g = np.arange(n_in) // gs
    g_idx = g[rng.permutation(n_in)].astype(np.int32) if act_order else None
    return codes, scales, zeros, g_idx, (g if g_idx is None else g_idx)


def _check(y, ref, x, w_abs):
    """fp16 tolerance: relative to sum_i |x_i| |w_ij| (the scale of the accumulated terms)."""
    y = _to_host(y).astype(np.float64)
    scale = np.abs(x.astype(np.float64)) @ w_abs
    assert y.shape == ref.shape
    np.testing.assert_array_less(np.abs(y - ref), 2e-3 * scale + 1e-3)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_quant_matmul_matches_dequantize_then_matmul(bits, act_order, batch):
    rng = np.random.default_rng(100 * bits + 10 * act_order + batch)
    n_in, n_out, gs = 160, 40, 32  # 3 split-K blocks of 64 (last partial), 3 column blocks of 16
    codes, scales, zeros, g_idx, g = _uniform_layer(rng, bits, n_in, n_out, gs, act_order)
    x = rng.standard_normal((batch, n_in)).astype(np.float16)
    bias = rng.standard_normal(n_out).astype(np.float32)
    y = K.quant_matmul(_to_device(x), _to_device(pack(codes, bits, axis=0)), _to_device(scales), _to_device(zeros),
                       _to_device(g_idx), bits, gs, n_in, bias=_to_device(bias))
    w = scales[g].astype(np.float64) * (codes - zeros[g].astype(np.float64))  # (in, out)
    assert _to_host(y).dtype == np.float16
    _check(y, x.astype(np.float64) @ w + bias, x, np.abs(w))


@pytest.mark.parametrize("bits, n_in, group_size, batch, dtype", [
    (4, 100, -1, 2, np.float32),   # in not a multiple of the period: padded words, one group
    (3, 96, 128, 1, np.float32),   # one partial group of 128 at 3 bits
    (2, 72, 64, 5, np.float16),    # last group partial, batch tile 8
    (4, 48, 24, 4, np.float16),    # a group size that splits a period: per-value groups
    (8, 40, 32, 2, np.float32),    # 8-bit (the glvq packing width of 5..8-bit groups)
    (4, 64, 32, 19, np.float16),   # batch beyond one tile of 16: two launches
])
def test_quant_matmul_edges(bits, n_in, group_size, batch, dtype):
    rng = np.random.default_rng(bits * n_in + batch)
    n_out = 24
    codes, scales, zeros, g_idx, g = _uniform_layer(rng, bits, n_in, n_out, group_size, False)
    x = rng.standard_normal((batch, n_in)).astype(dtype)
    y = K.quant_matmul(_to_device(x), _to_device(pack(codes, bits, axis=0)), _to_device(scales), _to_device(zeros),
                       None, bits, group_size, n_in)
    w = scales[g].astype(np.float64) * (codes - zeros[g].astype(np.float64))
    assert _to_host(y).dtype == dtype
    _check(y, x.astype(np.float64) @ w, x, np.abs(w))


def test_single_split_and_launch_sizes_from_the_table(monkeypatch):
    """kv >= in: no split-K (the block writes y itself); a changed table recompiles."""
    monkeypatch.setitem(K.LAUNCH, 2, {"tx": 8, "ty": 4, "kv": 256})
    rng = np.random.default_rng(5)
    codes, scales, zeros, _, g = _uniform_layer(rng, 4, 64, 20, 32, False)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    y = K.quant_matmul(_to_device(x), _to_device(pack(codes, 4, axis=0)), _to_device(scales), _to_device(zeros),
                       None, 4, 32, 64)
    w = scales[g].astype(np.float64) * (codes - zeros[g].astype(np.float64))
    _check(y, x.astype(np.float64) @ w, x, np.abs(w))


@pytest.mark.parametrize("bits", [3, 4])
def test_groups_change_within_a_thread_run(bits, monkeypatch):
    """ty = 1: one thread walks the whole 128-column slice, four groups of 32 (the cached
    scale and zero must follow the group)."""
    monkeypatch.setitem(K.LAUNCH, 1, {"tx": 8, "ty": 1, "kv": 128})
    rng = np.random.default_rng(bits)
    codes, scales, zeros, _, g = _uniform_layer(rng, bits, 256, 12, 32, False)
    x = rng.standard_normal((1, 256)).astype(np.float16)
    y = K.quant_matmul(_to_device(x), _to_device(pack(codes, bits, axis=0)), _to_device(scales), _to_device(zeros),
                       None, bits, 32, 256)
    w = scales[g].astype(np.float64) * (codes - zeros[g].astype(np.float64))
    _check(y, x.astype(np.float64) @ w, x, np.abs(w))


def test_quant_matmul_rejects_bad_arguments():
    rng = np.random.default_rng(0)
    codes, scales, zeros, _, _ = _uniform_layer(rng, 4, 64, 8, 32, False)
    qw, scales, zeros = _to_device(pack(codes, 4, axis=0)), _to_device(scales), _to_device(zeros)
    x = _to_device(np.ones((1, 64), np.float16))
    with pytest.raises(ValueError, match=r"`bits` must be one of \(2, 3, 4, 8\), got 5"):
        K.quant_matmul(x, qw, scales, zeros, None, 5, 32, 64)
    with pytest.raises(ValueError, match=r"`x` must be \(batch, in_features\) = \(batch, 64\)"):
        K.quant_matmul(x[:, :32], qw, scales, zeros, None, 4, 32, 64)
    with pytest.raises(ValueError, match=r"`qweight` must be int32 \(packed_length\(in_features, bits\), out\)"):
        K.quant_matmul(x, qw[:4], scales, zeros, None, 4, 32, 64)
    with pytest.raises(ValueError, match=r"`scales` must have n_groups = 2 rows"):
        K.quant_matmul(x, qw, scales[:1], zeros[:1], None, 4, 32, 64)
    with pytest.raises(ValueError, match=r"`g_idx` must be \(64,\)"):
        K.quant_matmul(x, qw, scales, zeros, _to_device(np.zeros(8, np.int32)), 4, 32, 64)
    with pytest.raises(ValueError, match="`x` must be float16 or float32"):
        K.quant_matmul(x.astype(np.float64), qw, scales, zeros, None, 4, 32, 64)


# ---------------------------------------------------------------------------- glvq


def _glvq_layer(d, bits, n_in, n_out, seed, col_scale=True, salience_frac=0.0):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n_out, n_in)) * np.exp(rng.normal(0, 0.5, (n_out, 1)))
    X = rng.standard_normal((n_in, 4 * n_in))
    spec = GLVQSpec(bits=bits, d=d, group_size=32, n_iter=1, col_scale=col_scale, encode="nearest_plane",
                    fit_encode=None, salience_frac=salience_frac)
    return quantize_weight_glvq(W, X @ X.T / X.shape[1], spec=spec, backend="numpy",
                                bias=np.linspace(-1, 1, n_out))


@pytest.mark.parametrize("d", [2, 4, 8])
@pytest.mark.parametrize("batch", [1, 4])
def test_lattice_matmul_matches_dequantize_then_matmul(d, batch):
    q = _glvq_layer(d, 2, 96, 40, seed=d + batch, col_scale=(d != 4))
    p = K.pack_lattice_layer(q)
    x = np.random.default_rng(d).standard_normal((batch, 96)).astype(np.float16)
    dev = {k: _to_device(v) if isinstance(v, np.ndarray) else v for k, v in p.items()}
    y = K.lattice_matmul(_to_device(x), dev["qweight_t"], dev["generators"], dev["centre"], dev["row_scale"],
                         dev["col_scale"], dev["bias"], bits=p["bits"], d=d, group_size=p["group_size"],
                         in_features=96)
    Wq = q.dequantize(np.float64)
    assert _to_host(y).dtype == np.float16
    _check(y, x.astype(np.float64) @ Wq.T + q.bias, x, np.abs(Wq).T)


def test_lattice_matmul_mixed_group_bits_and_float32():
    """Salience allocation: groups of 2 and 3 bits packed at 3 bits, different centres."""
    q = _glvq_layer(4, 2, 128, 24, seed=3, salience_frac=0.5)
    assert len(set(q.group_bits.tolist())) == 2
    p = K.pack_lattice_layer(q)
    assert p["bits"] == 3
    x = np.random.default_rng(1).standard_normal((2, 128)).astype(np.float32)
    dev = {k: _to_device(v) if isinstance(v, np.ndarray) else v for k, v in p.items()}
    y = K.lattice_matmul(_to_device(x), dev["qweight_t"], dev["generators"], dev["centre"], dev["row_scale"],
                         dev["col_scale"], dev["bias"], bits=3, d=4, group_size=32, in_features=128)
    Wq = q.dequantize(np.float64)
    _check(y, x.astype(np.float64) @ Wq.T + q.bias, x, np.abs(Wq).T)
