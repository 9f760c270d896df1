"""llm_adapter: QuantSpec, the pure quantize_weight, and the block-wise calibration driver.

Everything runs on a tiny random Llama (``llm_fixtures.tiny_llama``) and small random
layers; the file stays well under a minute.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm_adapter.calibration import (InlineSolver, find_blocks, load_layer, quantize_model, save_layer,
                                     select_linears)
from llm_adapter.methods.uniform import compute_grid, quantize_weight
from llm_adapter.methods.uniform import QuantSpec
from tests.llm_fixtures import BOS_ID, tiny_llama
from tests.oracles import gptq_fasterquant_reference

NUMPY = "numpy"  # the reference backend; the numba kernels have their own tests


# --------------------------------------------------------------------------- spec


@pytest.mark.parametrize("field, value, match", [
    ("bits", 1, "`bits` must be an int in \\[2, 8\\]"),
    ("bits", 9, "`bits`"),
    ("bits", 3.0, "`bits`"),
    ("group_size", 0, "`group_size` must be -1"),
    ("group_size", -2, "`group_size`"),
    ("sym", 1, "`sym` must be a bool"),
    ("clip", "max", "`clip` must be one of"),
    ("method", "awq", "`method` must be one of"),
    ("ordering", "lll", "`ordering` must be one of"),
    ("damp", -0.1, "`damp`"),
    ("block_size", 0, "`block_size`"),
    ("mu", 1.5, "`mu` must be a float in \\[0, 1\\]"),
    ("lam", -1.0, "`lam`"),
    ("n_samples", -1, "`n_samples`"),
    ("tau", "hot", "`tau`"),
    ("beam_width", -1, "`beam_width`"),
    ("alpha", "best", "`alpha` must be a float in \\[0, 1\\], 'sample' or 'closed_form'"),
    ("alpha", 2.0, "`alpha`"),
    ("alpha0", -0.5, "`alpha0`"),
    ("beta_m", 0.0, "`beta_m`"),
])
def test_spec_validation_names_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec(**{field: value})


def test_spec_is_frozen_and_roundtrips():
    spec = QuantSpec(bits=3, group_size=128, method="regcal", alpha="sample")
    with pytest.raises(AttributeError):
        spec.bits = 4
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    assert spec.joint and not QuantSpec(method="gptq").joint
    assert QuantSpec(method="ojbkq").beam == 4 and QuantSpec(method="regcal").beam == 1
    assert spec.n_groups(300) == 3 and QuantSpec().n_groups(300) == 1


# --------------------------------------------------------------------------- grid and the pure function


def _layer(seed, m=24, n=100, N=400):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m, n)) * np.exp(0.3 * rng.standard_normal(m))[:, None]
    X = rng.standard_normal((n, N)) * np.exp(0.5 * rng.standard_normal((n, 1)))
    return W, X @ X.T / N


@pytest.mark.parametrize("group_size, n_groups", [(-1, 1), (32, 4), (50, 2), (100, 1)])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_grid_shapes_and_code_range(group_size, n_groups, sym, method):
    W, H = _layer(0)
    spec = QuantSpec(bits=3, group_size=group_size, sym=sym, method=method)
    q = quantize_weight(W, H, None, spec, backend=NUMPY)
    assert q.codes.shape == W.shape and q.codes.dtype == np.uint8
    assert q.codes.max() <= 7
    assert q.scales.shape == q.zeros.shape == (W.shape[0], n_groups)
    assert np.all(q.scales > 0) and np.all(q.zeros == np.round(q.zeros))
    gs = W.shape[1] if group_size == -1 else group_size
    np.testing.assert_array_equal(q.g_idx, np.arange(W.shape[1]) // gs)
    if sym:
        assert np.all(q.zeros == 4)
    assert 0 <= q.stats["rel_loss"] < 1 and q.stats["loss"] >= 0
    assert q.dequantize().shape == W.shape


def test_rtn_is_round_to_nearest_and_reports_loss_only_with_h():
    W, H = _layer(1)
    spec = QuantSpec(bits=4, group_size=32, method="rtn")
    q = quantize_weight(torch.from_numpy(W), None, None, spec)
    s, z = q.scales[:, q.g_idx], q.zeros[:, q.g_idx]
    np.testing.assert_array_equal(q.codes, np.clip(np.floor(W / s + z + 0.5), 0, 15))
    assert "loss" not in q.stats
    q2 = quantize_weight(W, H, None, spec)
    np.testing.assert_array_equal(q.codes, q2.codes)
    assert q2.stats["loss"] > 0


def test_mse_clip_never_increases_the_grid_error():
    W, _ = _layer(2)
    for gs in (-1, 32):
        errs = []
        for clip in ("minmax", "mse"):
            q = quantize_weight(W, None, None, QuantSpec(bits=3, group_size=gs, clip=clip, method="rtn"))
            errs.append(np.sum(np.abs(q.dequantize() - W) ** 2.4, axis=1))
        assert np.all(errs[1] <= errs[0] + 1e-9)


def test_compute_grid_doctest_values():
    s, z = compute_grid(np.array([[-1.0, 0.5, 2.0]]), QuantSpec(bits=2))
    assert s.tolist() == [[1.0]] and z.tolist() == [[1.0]]


@pytest.mark.parametrize("bits, group_size", [(2, -1), (3, -1), (3, 32), (4, 64), (3, 48)])
def test_gptq_method_reproduces_the_gptq_loop(bits, group_size):
    W, H = _layer(3 + bits, m=40, n=160)
    ref, *_ = gptq_fasterquant_reference(W, H, bits=bits, group_size=None if group_size == -1 else group_size,
                                         act_order=True, static_groups=True, blocksize=128, percdamp=0.01)
    q = quantize_weight(W, H, None, QuantSpec(bits=bits, group_size=group_size, method="gptq"), backend=NUMPY)
    np.testing.assert_array_equal(q.codes, ref)
    # the stats are consistent: loss of what Babai returned, below its no-clipping bound
    # unless something was clipped
    assert q.stats["objective"] == pytest.approx(q.stats["loss"])
    assert q.stats["clipped_frac"] > 0 or q.stats["loss"] <= q.stats["babai_bound"]


def _joint_layer(seed, m=32, n=64, N=600):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m, n))
    Xq = rng.standard_normal((n, N)) * np.exp(0.4 * rng.standard_normal((n, 1)))
    X = Xq + 0.3 * rng.standard_normal((n, N)) + 0.2 * Xq[::-1]  # a structured shift
    return W, X, Xq


def _f(Q, W, X, Xq, alpha):
    """The joint objective evaluated directly from activations."""
    return (1 - alpha) * np.sum(((Q - W) @ Xq) ** 2) + alpha * np.sum((Q @ Xq - W @ X) ** 2)


@pytest.mark.parametrize("spec_kw, alpha", [
    ({"method": "ojbkq", "mu": 0.5, "n_samples": 4, "beam_width": 4}, 0.5),
    ({"method": "ojbkq", "mu": 1.0, "n_samples": 0, "beam_width": 1}, 1.0),
    ({"method": "regcal", "alpha": 0.25}, 0.25),
    ({"method": "regcal", "alpha": 0.5, "beam_width": 3}, 0.5),
    ({"method": "regcal", "alpha": "closed_form"}, None),
])
def test_joint_methods_beat_gptq_on_their_objective(spec_kw, alpha):
    W, X, Xq = _joint_layer(7)
    H = Xq @ Xq.T
    D = (X - Xq) @ Xq.T
    base = dict(bits=3, group_size=32, damp=0.0)
    g = quantize_weight(W, H, D, QuantSpec(method="gptq", **base), backend=NUMPY)
    q = quantize_weight(W, H, D, QuantSpec(**base, **spec_kw), backend=NUMPY, rng=0)
    if alpha is None:
        alpha = q.stats["alpha"]
        assert 0 < alpha <= 1
    fq, fg = _f(q.dequantize(np.float64), W, X, Xq, alpha), _f(g.dequantize(np.float64), W, X, Xq, alpha)
    assert fq < fg
    if spec_kw["method"] == "ojbkq":  # Klein / K-best keep the Babai point of the same target
        b = quantize_weight(W, H, D, QuantSpec(**base, method="regcal", alpha=alpha), backend=NUMPY)
        assert q.stats["objective"] <= b.stats["objective"] * (1 + 1e-12)


def test_klein_and_kbest_never_worse_than_babai_without_d():
    W, H = _layer(11, m=16, n=64)
    spec = dict(bits=3, group_size=32)
    g = quantize_weight(W, H, None, QuantSpec(method="gptq", **spec), backend=NUMPY)
    o = quantize_weight(W, H, None, QuantSpec(method="ojbkq", **spec), backend=NUMPY, rng=1)
    assert o.stats["loss"] <= g.stats["loss"] * (1 + 1e-12)
    assert o.stats["alpha"] == 0.0  # without D the target is W


def test_quantize_weight_input_validation():
    W, H = _layer(0, m=4, n=8)
    with pytest.raises(ValueError, match="`H` is required"):
        quantize_weight(W, None, None, QuantSpec(method="gptq"))
    with pytest.raises(ValueError, match="`H` must be \\(8, 8\\)"):
        quantize_weight(W, H[:4, :4], None, QuantSpec())
    with pytest.raises(TypeError, match="`spec` must be a QuantSpec"):
        quantize_weight(W, H, None, {"bits": 3})


def test_layer_checkpoint_roundtrip(tmp_path):
    W, H = _layer(0, m=6, n=20)
    q = quantize_weight(W, H, None, QuantSpec(bits=3, group_size=8), bias=np.ones(6))
    save_layer(tmp_path / "x.npz", q)
    r = load_layer(tmp_path / "x.npz")
    for f in ("codes", "scales", "zeros", "g_idx", "perm", "bias"):
        np.testing.assert_array_equal(getattr(r, f), getattr(q, f))
    assert (r.bits, r.group_size, r.stats["loss"]) == (3, 8, q.stats["loss"])
    assert not list(tmp_path.glob("*.tmp"))


# --------------------------------------------------------------------------- calibration on a tiny Llama


def _windows(n=5, T=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(2, 258, (n, T), generator=g)
    w[:, 0] = BOS_ID
    return w


def _no_hooks(model):
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_select_linears_by_pattern():
    model = tiny_llama()
    sel = select_linears(model)
    assert sorted(sel) == [0, 1] and len(sel[0]) == 7
    assert "lm_head" not in str(sel)
    mlp = select_linears(model, targets=["mlp.*"])
    assert all(n.split(".")[-2] == "mlp" for s in mlp.values() for n in s)
    one = select_linears(model, targets="model.layers.1.self_attn.q_proj")
    assert list(one) == [1]
    with pytest.raises(ValueError, match="no module matched `targets`"):
        select_linears(model, targets=["*.nonexistent"])
    assert find_blocks(model)[0] == "model.layers"


class _Recording(InlineSolver):
    """The default solver, recording what the driver submits."""

    def __init__(self, record):
        self.record = record

    def submit(self, name, W, H, D, spec, **kw):
        self.record(W, H, D)
        return super().submit(name, W, H, D, spec, **kw)


def test_calibration_statistics():
    """H/D shapes, groups in execution order, and H of the first layer equals X Xᵀ / N."""
    model = tiny_llama()
    win = _windows()
    order_cb = []

    def cb(name, q):
        order_cb.append(name)

    calls = []
    solver = _Recording(lambda W, H, D: calls.append((tuple(W.shape), H, D)))

    # float inputs of block 0's q_proj (before quantization changes anything)
    x0 = []
    h = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: x0.append(a[0]))
    with torch.no_grad():
        model(input_ids=win, use_cache=False)
    h.remove()
    X = torch.cat([x.reshape(-1, x.shape[-1]) for x in x0]).double().numpy()

    spec = QuantSpec(bits=4, group_size=32, method="ojbkq", n_samples=1, beam_width=1)
    res = quantize_model(model, win, spec, batch_size=4, progress=False, backend=NUMPY, callback=cb, solver=solver)
    assert len(res) == len(calls) == 14
    order = [n.split(".")[-1] for n in order_cb[:7]]
    assert order == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for (shape, H, D) in calls:
        n = shape[1]
        assert H.shape == D.shape == (n, n) and H.dtype == np.float64
        np.testing.assert_allclose(H, H.T, atol=1e-10)
        ev = np.linalg.eigvalsh(H)
        assert ev.min() > -1e-6 * ev.max()  # PSD up to float32 products
    np.testing.assert_allclose(calls[0][1], X.T @ X / X.shape[0], rtol=1e-5, atol=1e-7)
    assert np.abs(calls[0][2]).max() == 0  # block 0, first group: X = X̃
    assert np.abs(calls[3][2]).max() > 0  # o_proj sees quantized q/k/v
    assert calls[0][1] is calls[1][1]  # q/k/v share one H
    assert _no_hooks(model)
    # the model's weights are the dequantized codes
    q = res["model.layers.1.mlp.down_proj"]
    np.testing.assert_array_equal(model.model.layers[1].mlp.down_proj.weight.detach().numpy(), q.dequantize())


def test_gptq_on_real_calibration_h_matches_the_loop():
    model = tiny_llama()
    got = []
    real = quantize_weight
    quantize_model(model, _windows(), QuantSpec(bits=3, group_size=32), progress=False, backend=NUMPY,
                   targets=["*.o_proj", "*.down_proj"], solver=_Recording(lambda W, H, D: got.append((W.copy(), H))))
    assert len(got) == 4
    for W, H in got:
        ref, *_ = gptq_fasterquant_reference(W, H, bits=3, group_size=32, act_order=True, static_groups=True)
        q = real(W, H, None, QuantSpec(bits=3, group_size=32), backend=NUMPY)
        np.testing.assert_array_equal(q.codes, ref)


def test_not_true_sequential_and_rtn_paths():
    win = _windows()
    a = quantize_model(tiny_llama(), win, QuantSpec(bits=4, method="gptq"), true_sequential=False,
                       progress=False, backend=NUMPY)
    b = quantize_model(tiny_llama(), win, QuantSpec(bits=4, method="gptq"), progress=False, backend=NUMPY)
    k = "model.layers.0.self_attn.q_proj"
    np.testing.assert_array_equal(a[k].codes, b[k].codes)  # first group: same inputs
    assert len(a) == 14
    r = quantize_model(tiny_llama(), win, QuantSpec(bits=4, method="rtn"), progress=False)
    assert len(r) == 14 and "loss" not in r[k].stats
    r2 = quantize_model(tiny_llama(), win, QuantSpec(bits=4, method="rtn"), progress=False, rtn_calibrate=True)
    np.testing.assert_array_equal(r[k].codes, r2[k].codes)
    assert r2[k].stats["loss"] > 0


class _Kill(RuntimeError):
    pass


def test_hooks_removed_and_catcher_restored_on_error():
    model = tiny_llama()
    first = model.model.layers[0]

    def boom(name, q):
        raise _Kill(name)

    with pytest.raises(_Kill):
        quantize_model(model, _windows(), QuantSpec(bits=3, method="regcal", alpha=0.5), progress=False,
                       backend=NUMPY, callback=boom)
    assert _no_hooks(model)
    assert model.model.layers[0] is first


@pytest.mark.parametrize("spec", [
    QuantSpec(bits=3, group_size=32, method="ojbkq", n_samples=2, beam_width=2),
    QuantSpec(bits=3, method="regcal", alpha="sample"),
])
def test_resume_after_kill_gives_identical_codes(tmp_path, spec):
    win = _windows()
    full = quantize_model(tiny_llama(), win, spec, progress=False, backend=NUMPY, seed=3, batch_size=2)

    done = []

    def kill_after_5(name, q):
        done.append(name)
        if len(done) == 5:
            raise _Kill(name)

    ckpt = tmp_path / "ckpt"
    with pytest.raises(_Kill):
        quantize_model(tiny_llama(), win, spec, progress=False, backend=NUMPY, seed=3, batch_size=2,
                       checkpoint_dir=ckpt, callback=kill_after_5)
    assert len(list(ckpt.glob("*.npz"))) == 5
    resumed = quantize_model(tiny_llama(), win, spec, progress=False, backend=NUMPY, seed=3, batch_size=2,
                             checkpoint_dir=ckpt)
    assert list(resumed) == list(full)
    for name in full:
        np.testing.assert_array_equal(resumed[name].codes, full[name].codes, err_msg=name)
        np.testing.assert_array_equal(resumed[name].scales, full[name].scales)
    # a checkpoint of other settings is refused
    with pytest.raises(ValueError, match="`checkpoint_dir`"):
        quantize_model(tiny_llama(), win, QuantSpec(bits=4), progress=False, checkpoint_dir=ckpt)
