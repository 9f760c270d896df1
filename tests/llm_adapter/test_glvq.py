"""Tests of the glvq method (llm_adapter.methods.glvq): format, storage, guarantees."""

import numpy as np
import pytest

from bils.lattice import decode
from llm_adapter.calibration.checkpoints import load_layer, save_layer
from llm_adapter.methods.glvq import GLVQSpec, LatticeLayer, quantize_weight_glvq, salience_bits

BE = "numpy"


def _layer(seed=0, out=24, n=64, tokens=400):
    """Weights with uneven row norms and a correlated input Gram, like an LLM layer."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((out, n)) * np.exp(rng.normal(0, 0.5, (out, 1)))
    A = rng.standard_normal((n, n)) / np.sqrt(n) + np.eye(n)
    X = A @ (rng.standard_normal((n, tokens)) * np.exp(rng.normal(0, 0.7, (n, 1))))
    return W, X @ X.T / tokens


def _loss(W, H, Q, damp=0.01):
    Hd = H + damp * np.mean(np.diag(H)) * np.eye(H.shape[0])
    E = W - Q
    return float(np.sum((E @ Hd) * E))


@pytest.fixture(scope="module")
def layer_and_q():
    W, H = _layer()
    spec = GLVQSpec(bits=2, d=4, group_size=32, n_iter=4, salience_frac=0.5, mu=20.0, col_scale=True)
    return W, H, quantize_weight_glvq(W, H, spec=spec, backend=BE, bias=np.arange(24.0))


def test_dequantize_equals_decode_and_reported_loss(layer_and_q):
    W, H, q = layer_and_q
    Wq = q.dequantize(np.float64)
    assert Wq.shape == W.shape and q.n_groups == 2
    rs = q.row_scale.astype(np.float64)
    cs = q.col_scale.astype(np.float64)
    for g in range(q.n_groups):
        a, b = q.group_bounds(g)
        cb = q.codebook(g)
        Z = q.codes[:, a:b].T.astype(np.int64) + cb.lo[0]
        ref = decode(cb, Z).T * rs[:, None] * cs[None, a:b]
        np.testing.assert_allclose(Wq[:, a:b], ref, rtol=1e-12, atol=1e-12)
        assert q.codes[:, a:b].max() < 2 ** int(q.group_bits[g])
    assert q.stats["loss"] == pytest.approx(_loss(W, H, Wq), rel=1e-9)
    assert 0 < q.stats["rel_loss"] < 1
    assert q.dequantize().dtype == np.float32


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_storage_round_trip(layer_and_q, tmp_path, suffix):
    pytest.importorskip("safetensors") if suffix == ".safetensors" else None
    _, _, q = layer_and_q
    path = save_layer(tmp_path / f"layer{suffix}", q)
    r = load_layer(path)
    assert isinstance(r, LatticeLayer)
    assert (r.d, r.group_size, r.offset) == (q.d, q.group_size, q.offset)
    for name, a in q.to_arrays().items():
        b = getattr(r, name)
        assert b.dtype == a.dtype and b.shape == a.shape
        np.testing.assert_array_equal(b, a)
    np.testing.assert_array_equal(r.dequantize(), q.dequantize())
    assert r.stats["loss"] == pytest.approx(q.stats["loss"])
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves nothing behind


def test_load_rejects_other_formats(tmp_path):
    p = tmp_path / "x.npz"
    np.savez(p, meta=np.frombuffer(b'{"format": "gptq"}', dtype=np.uint8))
    with pytest.raises(ValueError, match="kind 'gptq', which no registered method reads"):
        load_layer(p)


def test_checkpoints_of_the_earlier_per_method_writers_stay_readable(layer_and_q, tmp_path):
    """glvq safetensors with the JSON under ``"glvq"``; uniform npz whose meta has no ``format``."""
    import json

    from safetensors.numpy import save_file

    from llm_adapter.methods.uniform import QuantSpec, quantize_weight

    _, _, q = layer_and_q
    save_file({k: np.ascontiguousarray(v) for k, v in q.to_arrays().items()}, str(tmp_path / "g.safetensors"),
              metadata={"glvq": json.dumps(q.metadata())})
    np.testing.assert_array_equal(load_layer(tmp_path / "g.safetensors").codes, q.codes)
    u = quantize_weight(np.random.default_rng(1).standard_normal((4, 8)), spec=QuantSpec(bits=3, method="rtn"))
    meta = json.dumps({"bits": u.bits, "group_size": u.group_size, "stats": u.stats}).encode()
    np.savez(tmp_path / "u.npz", codes=u.codes, scales=u.scales, zeros=u.zeros, g_idx=u.g_idx,
             meta=np.frombuffer(meta, dtype=np.uint8))
    r = load_layer(tmp_path / "u.npz")
    np.testing.assert_array_equal(r.dequantize(), u.dequantize())
    assert (r.bits, r.group_size, r.perm, r.bias) == (3, -1, None, None)


def test_bits_accounting(layer_and_q):
    _, _, q = layer_and_q
    out, n = q.shape
    assert q.group_bits.tolist() in ([3, 1], [1, 3])  # salience_frac=0.5 of 2 groups
    expected = (3 + 1) * 32 * out + 2 * 16 * 16 + 2 * 2 * 16 + 16 * out + 16 * n
    assert q.storage_bits() == expected
    assert q.bits_per_weight == pytest.approx(expected / (out * n))
    assert q.stats["bits_per_weight"] == q.bits_per_weight


def test_salience_bits_average():
    s = np.random.default_rng(1).random(11)
    b = salience_bits(s, 3, 0.25)
    assert b.mean() == 3 and np.sum(b == 4) == np.sum(b == 2) == 3
    assert np.all(s[b == 4].min() >= s[b == 3].max()) and np.all(s[b == 2].max() <= s[b == 3].min())
    np.testing.assert_array_equal(salience_bits(s, 2, 0.0), 2)


def test_nearest_plane_beats_round_off_baseline():
    """The documented ranking on a correlated layer: nearest plane < GLVQ's round-off."""
    W, H = _layer(seed=3, out=32, n=64)
    ro = quantize_weight_glvq(W, H, spec=GLVQSpec(d=8, group_size=32, encode="round_off", n_iter=5), backend=BE)
    npl = quantize_weight_glvq(W, H, spec=GLVQSpec(d=8, group_size=32, encode="nearest_plane", fit_encode=None,
                                                   n_iter=5), backend=BE)
    assert npl.stats["loss"] <= ro.stats["loss"]
    assert npl.stats["encode"] == npl.stats["fit_encode"] == "nearest_plane"


@pytest.mark.parametrize("encode", ["round_off", "nearest_plane", "exact"])
def test_fitting_does_not_increase_loss_single_group(encode):
    """One group: the fit only accepts decreasing steps, so n_iter > 0 is never worse
    (up to the fp16 rounding of the stored generator)."""
    W, H = _layer(seed=4, out=16, n=16)
    kw = dict(d=4, group_size=16, encode=encode, fit_encode=None, penalty=0.0)
    q0 = quantize_weight_glvq(W, H, spec=GLVQSpec(n_iter=0, **kw), backend=BE)
    q5 = quantize_weight_glvq(W, H, spec=GLVQSpec(n_iter=5, **kw), backend=BE)
    assert q5.stats["loss"] <= q0.stats["loss"] * (1 + 1e-3)
    assert q5.stats["fit_gain"] <= 1.0


def test_orders_dead_columns_and_torch_input():
    torch = pytest.importorskip("torch")
    W, H = _layer(seed=5, out=8, n=32)
    H[5, :] = H[:, 5] = 0.0  # a dead input column
    for order in ("natural", "act"):
        spec = GLVQSpec(d=4, group_size=16, n_iter=2, order=order)
        q = quantize_weight_glvq(torch.from_numpy(W).float(), torch.from_numpy(H), spec=spec, backend=BE)
        Wq = q.dequantize(np.float64)
        assert np.all(np.isfinite(Wq))
        Wz = W.copy()
        Wz[:, 5] = 0.0
        Hd = H.copy()
        Hd[5, 5] = 1.0
        assert q.stats["loss"] == pytest.approx(_loss(Wz, Hd, np.where(np.arange(32) == 5, 0.0, Wq)), rel=1e-5)


def test_unscaled_layer_has_no_scale_overhead():
    W, H = _layer(seed=6, out=8, n=16)
    q = quantize_weight_glvq(W, H, spec=GLVQSpec(d=8, group_size=16, n_iter=1, row_scale=False,
                                                 col_scale=False), backend=BE)
    assert q.row_scale is None and q.col_scale is None and q.mu is None
    assert q.storage_bits() == 2 * 8 * 16 + 16 * 64


@pytest.mark.parametrize("kwargs, match", [
    ({"bits": 0}, r"`bits` must be an int in \[1, 8\]"),
    ({"d": 3}, r"`d` must be one of \(2, 4, 8, 16, 32\)"),
    ({"group_size": 100}, r"`group_size` must be a positive multiple of `d` = 8"),
    ({"encode": "babai"}, r"`encode` must be one of"),
    ({"fit_encode": "babai"}, r"`fit_encode` must be None or one of"),
    ({"n_iter": -1}, r"`n_iter` must be an int >= 0"),
    ({"penalty": float("nan")}, r"`penalty` must be a finite float >= 0"),
    ({"sv_bounds": (2.0, 1.0)}, r"`sv_bounds` must be None or \(lo, hi\)"),
    ({"row_scale": 1}, r"`row_scale` must be a bool"),
    ({"order": "diag"}, r"`order` must be one of"),
    ({"salience_frac": 0.75}, r"`salience_frac` must be a float in \[0, 0.5\]"),
    ({"bits": 1, "salience_frac": 0.25}, r"needs `bits` >= 2"),
    ({"mu": 0.0}, r"`mu` must be None or a float > 0"),
    ({"beam_width": 0}, r"`beam_width` must be an int >= 1"),
    ({"max_nodes": 0}, r"`max_nodes` must be None or an int >= 1"),
])
def test_spec_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GLVQSpec(**kwargs)


def test_spec_dict_round_trip():
    s = GLVQSpec(bits=3, d=4, group_size=64, sv_bounds=(0.5, 2), mu=30.0)
    d = s.to_dict()
    assert d["method"] == "glvq" and s.method == "glvq" and not s.joint
    assert GLVQSpec.from_dict(d) == s


def test_input_validation():
    W, H = _layer(seed=7, out=4, n=16)
    with pytest.raises(TypeError, match="`spec` must be a GLVQSpec"):
        quantize_weight_glvq(W, H, spec={"bits": 2})
    with pytest.raises(ValueError, match=r"`W` must have a multiple of `d` = 8 columns, got 12"):
        quantize_weight_glvq(W[:, :12], H[:12, :12])
    with pytest.raises(ValueError, match=r"`H` must be \(16, 16\)"):
        quantize_weight_glvq(W, H[:8, :8])


# ---------------------------------------------------------------------------- kernel oracle
@pytest.mark.parametrize("bits, col_scale", [(2, False), (4, True)])
def test_kernel_reference_equals_dequantized_matmul(bits, col_scale):
    """The algorithm of the decode-GEMM kernel (llm_adapter.kernels), run in numpy."""
    from llm_adapter.kernels import lattice_matmul_reference, pack_lattice_layer

    W, H = _layer(seed=8, out=12, n=48)
    spec = GLVQSpec(bits=bits, d=8, group_size=32, n_iter=2, col_scale=col_scale)
    q = quantize_weight_glvq(W, H, spec=spec, backend=BE, bias=np.linspace(-1, 1, 12))
    packed = pack_lattice_layer(q)
    assert packed["qweight_t"].dtype == np.int32 and packed["qweight_t"].shape == (48 * bits // 32, 12)
    x = np.random.default_rng(9).standard_normal((3, 48))
    ref = x @ q.dequantize(np.float64).T + q.bias
    np.testing.assert_allclose(lattice_matmul_reference(x, packed), ref, rtol=1e-10, atol=1e-10)


def test_kernel_packing_rejects_unsupported_layers(layer_and_q):
    from llm_adapter.kernels import pack_lattice_layer

    with pytest.raises(ValueError, match="does not implement the µ-law compander"):
        pack_lattice_layer(layer_and_q[2])


def test_glvq_through_the_calibration_driver_and_resume(tmp_path):
    """`quantize_model` dispatches `GLVQSpec` to the glvq method; a killed run resumes identically."""
    torch = pytest.importorskip("torch")
    from tests.llm_fixtures import BOS_ID, tiny_llama

    from llm_adapter.calibration import quantize_model
    from llm_adapter.methods.glvq import LatticeLayer

    g = torch.Generator().manual_seed(0)
    win = torch.randint(2, 258, (4, 24), generator=g)
    win[:, 0] = BOS_ID
    spec = GLVQSpec(bits=2, d=4, group_size=32, n_iter=2)
    full = quantize_model(tiny_llama(), win, spec, progress=False, backend=BE, seed=1, batch_size=2)
    assert full and all(isinstance(q, LatticeLayer) for q in full.values())

    class Kill(Exception):
        pass

    done = []

    def kill_after_3(name, q):
        done.append(name)
        if len(done) == 3:
            raise Kill

    ckpt = tmp_path / "ckpt"
    with pytest.raises(Kill):
        quantize_model(tiny_llama(), win, spec, progress=False, backend=BE, seed=1, batch_size=2,
                       checkpoint_dir=ckpt, callback=kill_after_3)
    resumed = quantize_model(tiny_llama(), win, spec, progress=False, backend=BE, seed=1, batch_size=2,
                             checkpoint_dir=ckpt)
    assert list(resumed) == list(full)
    for name in full:
        np.testing.assert_array_equal(resumed[name].dequantize(), full[name].dequantize(), err_msg=name)
