"""Scale tuning after the codes are fixed (llm_adapter.calibration.tuning, issue #21)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm_adapter.calibration import quantize_model
from llm_adapter.calibration.tuning import _kl, _teacher, tune_scales
from llm_adapter.errors import ParameterError
from llm_adapter.formats import export_gptq, load_quantized, save_quantized
from llm_adapter.methods.uniform import QuantSpec
from tests.llm_fixtures import tiny_llama


def _windows(model, n=10, T=32, seed=0):
    return torch.randint(0, model.config.vocab_size, (n, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def quantized():
    """A tiny Llama, its float state, calibration windows and its W2 g32 gptq layers."""
    model = tiny_llama()
    float_state = {k: v.clone() for k, v in model.state_dict().items()}
    windows = _windows(model)
    layers = quantize_model(model, windows, QuantSpec(bits=2, group_size=32, method="gptq"), progress=False,
                            backend="numpy")
    return model, float_state, windows, layers


def _tune(quantized, **kw):
    model, float_state, windows, layers = quantized
    model.load_state_dict(float_state)
    kw = {"steps": 30, "lr": 1e-2, "eval_every": 10, "progress": False, **kw}
    return tune_scales(model, layers, windows, **kw)


def test_loss_decreases_codes_fixed_scales_fp16(quantized):
    model, _, _, layers = quantized
    res = _tune(quantized)
    assert res.holdout_kl["after"] < res.holdout_kl["before"]
    assert res.best_step > 0
    train = [h["train_kl"] for h in res.history[1:]]
    assert train[-1] < train[0]
    for name, q in layers.items():
        t = res.layers[name]
        assert np.array_equal(t.codes, q.codes) and t.codes.dtype == q.codes.dtype
        assert np.array_equal(t.zeros, q.zeros) and np.array_equal(t.g_idx, q.g_idx)
        assert t.scales.shape == q.scales.shape and t.scales.dtype == np.float32
        assert np.isfinite(t.scales).all() and (t.scales > 0).all()
        assert np.array_equal(t.scales.astype(np.float16).astype(np.float32), t.scales)  # fp16-representable
        assert t.stats["tune"]["best_step"] == res.best_step and "tune" not in q.stats  # input untouched
        # the model holds the tuned dequantized weights
        assert torch.equal(model.get_submodule(name).weight, torch.from_numpy(t.dequantize()))
    assert any(not np.array_equal(res.layers[n].scales, q.scales) for n, q in layers.items())


def test_deterministic(quantized):
    a, b = _tune(quantized, steps=10, eval_every=5), _tune(quantized, steps=10, eval_every=5)
    for name in a.layers:
        assert np.array_equal(a.layers[name].scales, b.layers[name].scales)
    assert a.history[-1]["holdout_kl"] == b.history[-1]["holdout_kl"]


def test_zero_steps_only_rounds(quantized):
    _, _, _, layers = quantized
    res = _tune(quantized, steps=0)
    assert res.best_step == 0 and res.steps == 0
    for name, q in layers.items():
        assert np.array_equal(res.layers[name].scales, q.scales.astype(np.float16).astype(np.float32))


def test_save_load_round_trip_and_gptq_export(quantized, tmp_path):
    model, _, _, layers = quantized
    res = _tune(quantized, steps=10, eval_every=5)
    for dtype in ("float16", "float32"):
        path = save_quantized(tmp_path / dtype, res.layers, QuantSpec(bits=2, group_size=32).to_dict(),
                              scale_dtype=dtype)
        back, _ = load_quantized(path)
        for name, t in res.layers.items():
            assert np.array_equal(back[name].scales, t.scales)
            assert np.array_equal(back[name].dequantize(), t.dequantize())
    out = export_gptq(model, res.layers, tmp_path / "gptq")
    assert (out / "config.json").exists()


def test_tunes_loaded_layers(quantized, tmp_path):
    model, float_state, windows, layers = quantized
    path = save_quantized(tmp_path / "q", layers, {"bits": 2})
    loaded, _ = load_quantized(path)
    model.load_state_dict(float_state)
    res = tune_scales(model, loaded, windows, steps=10, lr=1e-2, eval_every=5, progress=False)
    assert res.holdout_kl["best"] <= res.holdout_kl["before"]
    assert set(res.layers) == set(layers)


def test_norms(quantized):
    model, float_state, _, _ = quantized
    res = _tune(quantized, norms=True, steps=10, eval_every=5)
    assert res.norms and all(k.endswith("norm.weight") for k in res.norms)
    state = model.state_dict()
    for k, v in res.norms.items():
        assert torch.equal(state[k], v)
    assert any(not torch.equal(v, float_state[k]) for k, v in res.norms.items())
    model.load_state_dict(float_state)


def test_failure_leaves_the_float_model(quantized, monkeypatch):
    model, float_state, windows, layers = quantized
    model.load_state_dict(float_state)

    def boom(self, *a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(torch.optim.Adam, "step", boom)
    with pytest.raises(RuntimeError, match="boom"):
        tune_scales(model, layers, windows, steps=3, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, float_state[k]), k
    assert all(p.requires_grad for p in model.parameters())


def test_topk_kl_is_exact_kl_of_coarsened_distributions():
    g = torch.Generator().manual_seed(1)
    p_logits, q_logits = torch.randn(5, 12, generator=g), torch.randn(5, 12, generator=g)

    class M(torch.nn.Module):
        def forward(self, input_ids, use_cache=False):
            return type("Out", (), {"logits": p_logits[None]})()

    full = _teacher(M(), torch.zeros(1, 5, dtype=torch.long), top_k=12)[0]
    lp, lq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    exact = (lp.exp() * (lp - lq)).sum(-1).mean()
    assert torch.allclose(_kl(q_logits, full), exact, atol=1e-6)
    top = _teacher(M(), torch.zeros(1, 5, dtype=torch.long), top_k=3)[0]
    idx = top[1]
    rest_p = 1 - lp.exp().gather(-1, idx).sum(-1)
    rest_q = 1 - lq.exp().gather(-1, idx).sum(-1)
    coarse = ((lp.gather(-1, idx).exp() * (lp.gather(-1, idx) - lq.gather(-1, idx))).sum(-1)
              + rest_p * (rest_p.log() - rest_q.log())).mean()
    assert torch.allclose(_kl(q_logits, top), coarse, atol=1e-6)
    assert _kl(q_logits, top) <= exact + 1e-6  # coarsening never increases the divergence


def test_quantize_model_with_tune_steps():
    model = tiny_llama(seed=1)
    windows = _windows(model, n=8)
    report = {}
    spec = QuantSpec(bits=2, group_size=32, method="rtn", tune_steps=10, tune_lr=1e-2)
    layers = quantize_model(model, windows, spec, progress=False, report=report)
    assert report["tune"]["steps"] == 10
    assert report["tune"]["holdout_kl"]["best"] <= report["tune"]["holdout_kl"]["before"]
    for name, q in layers.items():
        assert "tune" in q.stats
        assert torch.equal(model.get_submodule(name).weight, torch.from_numpy(q.dequantize()))


@pytest.mark.parametrize("kw, match", [
    ({"steps": -1}, "`steps` must be an int >= 0"),
    ({"lr": 0.0}, "`lr` must be a finite float > 0"),
    ({"top_k": 0}, "`top_k` must be an int >= 1"),
    ({"holdout": 1.0}, r"`holdout` must be a float in \(0, 1\)"),
    ({"batch_size": 0}, "`batch_size` must be an int >= 1"),
    ({"layers": {}}, "`layers` must be a non-empty dict"),
    ({"layers": {"model.nope": None}}, "only uniform-grid"),
    ({"windows": torch.zeros(1, 8, dtype=torch.long)}, "at least 2 windows"),
    ({"windows": torch.zeros(4, 8)}, "2-D integer"),
])
def test_errors_name_the_argument(quantized, kw, match):
    model, _, windows, layers = quantized
    args = {"model": model, "layers": layers, "windows": windows, "progress": False, **kw}
    with pytest.raises(ParameterError, match=match):
        tune_scales(**args)


def test_layer_name_and_shape_checked(quantized):
    model, _, windows, layers = quantized
    name, q = next(iter(layers.items()))
    with pytest.raises(ParameterError, match="names no module"):
        tune_scales(model, {"model.missing": q}, windows, progress=False)
    other = next(n for n, x in layers.items() if x.shape != q.shape)
    with pytest.raises(ParameterError, match="has shape"):
        tune_scales(model, {other: q}, windows, progress=False)


@pytest.mark.parametrize("field, value, match", [
    ("tune_steps", -1, "`tune_steps` must be an int >= 0"),
    ("tune_steps", 1.5, "`tune_steps` must be an int >= 0"),
    ("tune_lr", 0, "`tune_lr` must be a finite float > 0"),
    ("tune_norms", 1, "`tune_norms` must be a bool"),
])
def test_spec_fields(field, value, match):
    with pytest.raises(ParameterError, match=match):
        QuantSpec(**{field: value})
    assert QuantSpec(tune_steps=5).tune_steps == 5


def test_cli_quantize_with_tune_steps(tmp_path, capsys, tiny_dir, text_file):
    from tests.llm_fixtures import run_cli

    common = ["quantize", "--model", tiny_dir, "--method", "rtn", "--bits", "2", "--group-size", "32",
              "--calib", text_file, "--calib-windows", "4", "--seqlen", "32", "--backend", "numpy"]
    code, _, err = run_cli(capsys, *common, "--tune-steps", "4", "--tune-lr", "0.01", "--out", tmp_path / "q")
    assert code == 0, err
    layers, meta = load_quantized(tmp_path / "q")
    assert meta["spec"]["tune_steps"] == 4 and meta["spec"]["tune_lr"] == 0.01
    assert all(q.stats["tune"]["steps"] == 4 for q in layers.values())
    assert all(np.array_equal(q.scales.astype(np.float16).astype(np.float32), q.scales) for q in layers.values())
    code, _, err = run_cli(capsys, *common, "--tune-steps", "2", "--tune-norms", "--out", tmp_path / "q2")
    assert code == 2 and "--tune-norms" in err and not (tmp_path / "q2").exists()
    code, _, err = run_cli(capsys, *common, "--tune-steps", "-1", "--out", tmp_path / "q3")
    assert code == 2 and "--tune-steps" in err


def test_benchmark_from_quantized_and_table(quantized, tmp_path):
    from types import SimpleNamespace

    from tests.llm_adapter.test_quality_options import _llm_quality

    lq = _llm_quality()
    model, float_state, windows, layers = quantized
    path = lq._save_layers(tmp_path / "saved", "shakespeare:w2g128/gptq/clip=mse", layers,
                           QuantSpec(bits=2, group_size=32, method="gptq", clip="mse"), "tiny", quant_time_s=3.0)
    args = SimpleNamespace(calib_corpus="shakespeare", seed=0, save_quantized=tmp_path / "tuned", model="tiny")
    seen = []

    def ppls():  # a stand-in evaluation: the first weight's mean, so before != after
        seen.append(float(model.get_submodule("model.layers.0.mlp.up_proj").weight.detach().abs().mean()))
        return {"shakespeare": 50.0 + seen[-1], "sotu": 30.0 + seen[-1]}

    run = lq._tune_saved(path, model, float_state, windows, {"tune_steps": 10, "tune_lr": 0.01}, ppls, args)
    assert run["key"] == "shakespeare:w2g128/gptq/clip=mse/tune_lr=0.01/tune_steps=10"
    assert run["spec"]["clip"] == "mse" and run["spec"]["tune_steps"] == 10
    assert run["base_quant_time_s"] == 3.0 and run["quant_time_s"] == pytest.approx(3.0 + run["tune_time_s"])
    assert run["ppl_before_tune"]["shakespeare"] == 50.0 + seen[0] and len(seen) == 2
    assert run["tune"]["holdout_kl"]["after"] < run["tune"]["holdout_kl"]["before"]
    back, meta = load_quantized(lq._run_dir(tmp_path / "tuned", run["key"]))
    assert meta["spec"]["tune_steps"] == 10 and meta["model"]["run"] == run["key"]
    q = back["model.layers.0.mlp.up_proj"]
    assert np.array_equal(q.scales, q.scales.astype(np.float16).astype(np.float32))
    with pytest.raises(SystemExit, match="would change the codes"):
        lq._tune_saved(path, model, float_state, windows, {"bits": 3}, ppls, args)
    with pytest.raises(SystemExit, match="not of --calib-corpus"):
        lq._tune_saved(path, model, float_state, windows, {}, ppls, SimpleNamespace(**{**vars(args),
                                                                                     "calib_corpus": "mixed"}))
    key = run["key"]
    data = {"protocol": {"texts": ["shakespeare", "sotu"], "calib_windows": 32, "eval_windows": 8},
            "float": {"shakespeare": 40.0, "sotu": 20.0}, "runs": {key: run}}
    table = lq.markdown(data)
    assert "Scale tuning" in table and f"| `{key}` |" in table and " → " in table
    model.load_state_dict(float_state)
