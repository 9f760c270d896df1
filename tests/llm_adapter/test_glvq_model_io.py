"""glvq at model level: native directory format, LatticeLinear, replace_linear, CLI."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from llm_adapter.formats import QuantizedFormatError, export_gptq, load_quantized, save_quantized  # noqa: E402
from llm_adapter.methods.glvq import GLVQSpec, LatticeLayer, quantize_weight_glvq  # noqa: E402
from llm_adapter.nn import LatticeLinear, QuantLinear, replace_linear  # noqa: E402
from llm_adapter.methods.uniform import quantize_weight  # noqa: E402
from llm_adapter.methods.uniform import QuantSpec  # noqa: E402
from tests.llm_fixtures import dequantized_perplexity, run_cli  # noqa: E402


def _layer(seed=0, out=12, n=64, tokens=300):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((out, n)) * np.exp(rng.normal(0, 0.5, (out, 1)))
    X = rng.standard_normal((n, tokens)) * np.exp(rng.normal(0, 0.5, (n, 1)))
    return W, X @ X.T / tokens


SPECS = {
    "w2": GLVQSpec(bits=2, d=8, group_size=32, n_iter=2, encode="nearest_plane", fit_encode=None),
    # every optional tensor: salience (bits 1/2/3 -> 4-bit packing), µ-law, column scales, bias
    "all": GLVQSpec(bits=2, d=4, group_size=16, n_iter=2, encode="nearest_plane", fit_encode=None,
                    salience_frac=0.25, mu=10.0, col_scale=True),
    "w4_noscale": GLVQSpec(bits=4, d=4, group_size=64, n_iter=1, encode="round_off", row_scale=False),
}


@pytest.fixture(scope="module", params=list(SPECS))
def glvq_layer(request):
    W, H = _layer(seed=len(request.param))
    bias = np.linspace(-1, 1, W.shape[0]) if request.param == "all" else None
    return quantize_weight_glvq(W, H, spec=SPECS[request.param], backend="numpy", bias=bias)


def _assert_same_layer(a: LatticeLayer, b: LatticeLayer):
    np.testing.assert_array_equal(a.codes, b.codes)
    for f in ("generators", "group_bits", "row_scale", "col_scale", "mu", "amax", "bias"):
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None), f
        if x is not None:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
            assert np.asarray(x).dtype == np.asarray(y).dtype, f
    assert (a.d, a.group_size, a.offset) == (b.d, b.group_size, b.offset)
    np.testing.assert_array_equal(a.dequantize(np.float64), b.dequantize(np.float64))


def test_native_round_trip_mixed_uniform_and_glvq(glvq_layer, tmp_path):
    W, H = _layer(seed=9)
    uni = quantize_weight(W, H, None, QuantSpec(bits=3, group_size=32, method="gptq"), backend="numpy")
    path = save_quantized(tmp_path / "q", {"a.glvq": glvq_layer, "b.gptq": uni}, GLVQSpec().to_dict())
    meta = json.loads((path / "quant_config.json").read_text())
    assert meta["format_version"] == 2
    m = meta["layers"]["a.glvq"]
    assert m["kind"] == "glvq" and m["bits_per_weight"] == pytest.approx(glvq_layer.bits_per_weight)
    assert m["pack_bits"] == min(w for w in (2, 3, 4, 8) if w >= glvq_layer.group_bits.max())
    layers, meta2 = load_quantized(path)
    assert list(layers) == ["a.glvq", "b.gptq"] and isinstance(layers["a.glvq"], LatticeLayer)
    _assert_same_layer(layers["a.glvq"], glvq_layer)
    np.testing.assert_array_equal(layers["b.gptq"].dequantize(), uni.dequantize())
    assert layers["a.glvq"].stats["method"] == "glvq"


def test_uniform_only_directories_stay_version_1(tmp_path):
    W, H = _layer()
    uni = quantize_weight(W, H, None, QuantSpec(bits=4, method="rtn"))
    path = save_quantized(tmp_path / "q", {"fc": uni})
    assert json.loads((path / "quant_config.json").read_text())["format_version"] == 1


def test_packed_codes_are_compact_on_disk(tmp_path):
    """W2 glvq: 2-bit packing (16 codes per int32), not one byte per code."""
    W, H = _layer(out=64, n=256)
    q = quantize_weight_glvq(W, H, spec=SPECS["w2"], backend="numpy")
    path = save_quantized(tmp_path / "q", {"fc": q})
    from safetensors import safe_open

    with safe_open(str(path / "quantized.safetensors"), framework="numpy") as f:
        assert f.get_tensor("fc.lcodes").shape == (64, 16)
        assert f.get_tensor("fc.generators").dtype == np.float16


@pytest.mark.filterwarnings("ignore::llm_adapter.errors.IntegrityWarning")
def test_glvq_load_errors_name_the_problem(tmp_path):
    W, H = _layer()
    q = quantize_weight_glvq(W, H, spec=SPECS["w2"], backend="numpy")
    path = save_quantized(tmp_path / "q", {"fc": q})
    cfg = path / "quant_config.json"
    good = json.loads(cfg.read_text())
    good.pop("checksums")  # the checks behind the checksum (see test_format_integrity.py)
    from safetensors.numpy import load_file, save_file

    st = str(path / "quantized.safetensors")
    save_file(load_file(st), st, metadata={"format": "bils-quantized"})

    def corrupt(fn, match):
        c = json.loads(json.dumps(good))
        fn(c["layers"]["fc"])
        cfg.write_text(json.dumps(c))
        with pytest.raises(QuantizedFormatError, match=match):
            load_quantized(path)

    corrupt(lambda m: m.pop("d"), "glvq layer 'fc' metadata is missing")
    corrupt(lambda m: m.update(pack_bits=5), "`pack_bits` must be one of")
    corrupt(lambda m: m.update(in_features=72), "`lcodes` must be int32")
    corrupt(lambda m: m.update(n_groups=3), "`n_groups` 3 does not match")
    corrupt(lambda m: m.update(optional=["zeros"]), "unknown tensor 'zeros'")
    corrupt(lambda m: m.update(optional=["mu"]), "has no tensor `mu`")


def test_glvq_save_validates(tmp_path):
    W, H = _layer()
    q = quantize_weight_glvq(W, H, spec=SPECS["w2"], backend="numpy")
    bad = LatticeLayer(**{**q.__dict__, "codes": q.codes.astype(np.int64) + 3})
    with pytest.raises(QuantizedFormatError, match=r"layer 'fc': `codes` of group 0 must lie in \[0, 3\]"):
        save_quantized(tmp_path / "q", {"fc": bad})
    assert not (tmp_path / "q").exists()


def test_lattice_linear_equals_cpu_dequantize(glvq_layer):
    m = LatticeLinear(glvq_layer)
    W = torch.from_numpy(glvq_layer.dequantize(np.float64))
    x = torch.randn(5, glvq_layer.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    bias = None if glvq_layer.bias is None else torch.from_numpy(np.asarray(glvq_layer.bias, np.float64))
    expected = torch.nn.functional.linear(x, W, bias)
    torch.testing.assert_close(m(x), expected, rtol=0, atol=0)
    assert torch.equal(m.dequantize(torch.float64), W)
    _assert_same_layer(m.to_lattice_layer(), glvq_layer)
    # float32 input: the cache follows the dtype
    torch.testing.assert_close(m(x.float()), expected.float(), rtol=1e-5, atol=1e-5)
    # state_dict round trip into a fresh module
    m2 = LatticeLinear(glvq_layer)
    m2.load_state_dict(m.state_dict())
    torch.testing.assert_close(m2(x), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="LatticeLinear expects"):
        m(torch.ones(2, glvq_layer.shape[1] + 1))
    with pytest.raises(TypeError, match="must be a LatticeLayer"):
        LatticeLinear("not a layer")


def test_replace_linear_mixes_lattice_and_uniform():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    W0, W2 = model[0].weight.detach().double().numpy(), model[2].weight.detach().double().numpy()
    H0 = np.eye(64)
    q0 = quantize_weight_glvq(W0, H0, spec=GLVQSpec(bits=2, d=8, group_size=32, n_iter=1), backend="numpy")
    q2 = quantize_weight(W2, spec=QuantSpec(bits=4, method="rtn"))
    x = torch.randn(3, 64)
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(q0.dequantize()))
        model[2].weight.copy_(QuantLinear.from_quantized(q2).dequantize())  # fp16 scales
        ref = model(x)
    replace_linear(model, {"0": q0, "2": q2})
    assert isinstance(model[0], LatticeLinear) and isinstance(model[2], QuantLinear)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)  # old bias kept on the lattice layer
    with pytest.raises(ValueError, match="belongs to no registered method"):
        replace_linear(model, {"0": "codes"})


def test_export_gptq_refuses_glvq_layers(tmp_path):
    from tests.llm_fixtures import tiny_llama

    model = tiny_llama()
    name = "model.layers.0.self_attn.q_proj"
    W = model.get_submodule(name).weight.detach().double().numpy()
    q = quantize_weight_glvq(W, np.eye(W.shape[1]), spec=GLVQSpec(bits=2, d=8, group_size=32, n_iter=0),
                             backend="numpy")
    from llm_adapter.formats import GPTQExportError

    with pytest.raises(GPTQExportError, match=r"LatticeLayer \(glvq\), not a uniform-grid layer"):
        export_gptq(model, {name: q}, tmp_path / "gptq")
    assert not (tmp_path / "gptq").exists()


# ------------------------------------------------------------------------------------ CLI
_run = run_cli



def test_cli_glvq_quantize_save_evaluate(tmp_path, capsys, tiny_dir, text_file):
    code, out, err = _run(capsys, "quantize", "--model", tiny_dir, "--method", "glvq", "--bits", "2",
                          "--lattice-dim", "8", "--group-size", "32", "--encode", "nearest_plane",
                          "--fit-iters", "2", "--calib", text_file, "--calib-windows", "2", "--seqlen", "32",
                          "--backend", "numpy", "--out", tmp_path / "q")
    assert code == 0, err
    assert "quantizing" in out and "d = 8" in out and "bits per weight" in out
    layers, meta = load_quantized(tmp_path / "q")
    assert len(layers) == 14 and all(isinstance(l, LatticeLayer) for l in layers.values())
    assert meta["spec"]["method"] == "glvq" and meta["spec"]["d"] == 8 and meta["format_version"] == 2
    bpw = float(out.split("storage: ")[1].split()[0])
    total = sum(l.storage_bits() for l in layers.values()) / sum(l.codes.size for l in layers.values())
    assert bpw == pytest.approx(total, abs=1e-4) and 2 < bpw < 3  # tiny layers: generator overhead

    code, out, err = _run(capsys, "evaluate", "--quantized", tmp_path / "q", "--text", text_file,
                          "--windows", "2", "--seqlen", "32")
    assert code == 0, err
    ppl = float(out.split("perplexity")[1].split()[0])
    assert ppl == pytest.approx(dequantized_perplexity(tiny_dir, layers, text_file, seqlen=32), rel=1e-4)


@pytest.mark.parametrize("argv, flag", [
    (["--lattice-dim", "3"], "--lattice-dim"),
    (["--group-size", "-1"], "--group-size"),
    (["--group-size", "12"], "--group-size"),
    (["--salience-frac", "0.7"], "--salience-frac"),
    (["--fit-iters", "-1"], "--fit-iters"),
    (["--export-gptq", "{tmp}/g"], "--export-gptq"),
])
def test_cli_glvq_errors_name_the_flag(tmp_path, capsys, argv, flag):
    code, _, err = _run(capsys, "quantize", "--method", "glvq", "--out", tmp_path / "q",
                        *(a.format(tmp=tmp_path) for a in argv))
    assert code == 2 and flag in err, err
    assert not (tmp_path / "q").exists()
