"""The method registry: the five built-in methods, unchanged codes, a method from outside the package."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from llm_adapter import GLVQSpec, QuantSpec, methods, quantize_model  # noqa: E402
from llm_adapter.calibration import ExecutorSolver  # noqa: E402
from llm_adapter.cli import main  # noqa: E402
from llm_adapter.formats import load_quantized, save_quantized  # noqa: E402
from llm_adapter.methods.uniform import QuantizedLayer, Solution, register_uniform  # noqa: E402
from llm_adapter.nn import QuantLinear, replace_linear  # noqa: E402
from tests.llm_fixtures import tiny_llama  # noqa: E402

#: The five methods on the tiny model (hidden 32): what ``data/method_codes.json`` was made with,
#: before the restructuring of issue #16 (codes, scales, zeros, generators... per layer, sha256).
SPECS = {
    "rtn": QuantSpec(bits=4, group_size=32, method="rtn"),
    "gptq": QuantSpec(bits=3, group_size=32, method="gptq"),
    "ojbkq": QuantSpec(bits=3, group_size=32, method="ojbkq", n_samples=3),
    "regcal": QuantSpec(bits=3, group_size=32, method="regcal", alpha="sample"),
    "glvq": GLVQSpec(bits=2, d=4, group_size=32, n_iter=2, encode="nearest_plane"),
}
FIELDS = ("codes", "scales", "zeros", "generators", "group_bits", "row_scale", "col_scale", "mu", "amax", "g_idx",
          "perm")
BASELINE = Path(__file__).parent / "data" / "method_codes.json"


def _tiny():
    return tiny_llama(seed=0, hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2)


def _windows():
    return torch.randint(0, 200, (8, 24), generator=torch.Generator().manual_seed(1))


def _digests(layers):
    out = {}
    for name, q in layers.items():
        for f in FIELDS:
            v = getattr(q, f, None)
            if v is not None:
                v = np.asarray(v)
                out[f"{name}/{f}"] = hashlib.sha256(np.ascontiguousarray(v).tobytes()
                                                    + str(v.dtype).encode()).hexdigest()[:16]
    return out


def test_the_five_methods_are_registered():
    assert methods.names()[:5] == ("rtn", "gptq", "ojbkq", "regcal", "glvq")
    glvq = methods.get("glvq")
    assert glvq.spec_type is GLVQSpec and glvq.format.kind == "glvq"
    assert methods.for_spec(QuantSpec(method="ojbkq")).name == "ojbkq"
    assert methods.for_kind("uniform").layer_type is QuantizedLayer
    with pytest.raises(KeyError, match="`method` must be one of"):
        methods.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        methods.register(glvq)
    with pytest.raises(TypeError, match="must be a GLVQSpec"):
        methods.for_spec(type("S", (), {"method": "glvq"})())


@pytest.mark.parametrize("method", list(SPECS))
def test_codes_identical_to_before_the_restructuring(method):
    """Every method's codes, grids and generators on the tiny model equal the committed
    digests, made with the code before issue #16's restructuring."""
    layers = quantize_model(_tiny(), _windows(), SPECS[method], backend="numpy", progress=False, seed=0)
    want = json.loads(BASELINE.read_text())[method]
    got = _digests(layers)
    assert got.keys() == want.keys()
    differ = sorted(k for k in want if got[k] != want[k])
    assert not differ, f"{len(differ)} arrays changed: {differ[:5]}"


def test_executor_solver_gives_the_same_codes():
    spec = SPECS["ojbkq"]
    ref = quantize_model(_tiny(), _windows(), spec, backend="numpy", progress=False, targets="self_attn.*")
    with ThreadPoolExecutor(2) as pool:
        got = quantize_model(_tiny(), _windows(), spec, backend="numpy", progress=False, targets="self_attn.*",
                             solver=ExecutorSolver(pool))
    assert list(got) == list(ref)
    for name in ref:
        np.testing.assert_array_equal(got[name].codes, ref[name].codes)


# --------------------------------------------------------------------------- a method from outside
def _floor_solve(prob):
    """A toy uniform-grid method: round every weight down on the grid."""
    codes = np.clip(np.floor(prob.W / prob.S.T + prob.Z.T), 0, prob.spec.maxq)
    return Solution(target=prob.W, codes=codes, stats={"clipped_frac": 0.0})


@pytest.fixture
def floor_method():
    method = register_uniform("floor", _floor_solve, needs_calibration=False, description="round down (a test)")
    yield method
    methods.unregister("floor")


def test_a_method_registered_from_outside_runs_end_to_end(floor_method, tmp_path, tiny_dir, text_file):
    assert "floor" in methods.names()
    model = _tiny()
    spec = QuantSpec(bits=4, group_size=32, method="floor")
    layers = quantize_model(model, _windows(), spec, progress=False)
    q = layers["model.layers.0.mlp.up_proj"]
    assert q.stats["method"] == "floor" and isinstance(q, QuantizedLayer)
    W = tiny_llama(seed=0, hidden=32, intermediate=64, layers=2, heads=4,
                   kv_heads=2).model.layers[0].mlp.up_proj.weight.detach().numpy()
    S = q.scales.astype(np.float64)[:, q.g_idx]
    Z = q.zeros.astype(np.float64)[:, q.g_idx]
    np.testing.assert_array_equal(q.codes, np.clip(np.floor(W.astype(np.float64) / S + Z), 0, 15))
    path = save_quantized(tmp_path / "q", layers, spec.to_dict())
    loaded, meta = load_quantized(path)
    assert methods.spec_from_dict(meta["spec"]) == spec
    np.testing.assert_array_equal(loaded["model.layers.0.mlp.up_proj"].codes, q.codes)
    replace_linear(model, loaded)
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)
    # and on the command line: --method choices come from the registry
    out = tmp_path / "cli"
    rc = main(["quantize", "--model", str(tiny_dir), "--method", "floor", "--bits", "4", "--group-size", "32",
               "--calib", str(text_file), "--calib-windows", "2", "--seqlen", "16", "--out", str(out)])
    assert rc == 0
    assert json.loads((out / "quant_config.json").read_text())["spec"]["method"] == "floor"


# --------------------------------------------------------------------------- files written before
SAVED = Path(__file__).parent / "data" / "saved_before_16"


def test_files_written_before_the_restructuring_stay_readable():
    """Native directories (v1 uniform; v2 mixed with fp16 scales) and per-layer checkpoints
    (uniform npz, glvq npz and safetensors) written by the code before issue #16."""
    from llm_adapter.calibration import load_layer
    from llm_adapter.methods.glvq import LatticeLayer

    with np.load(SAVED / "expected.npz") as z:
        want = {k: z[k] for k in z.files}
    v1, meta1 = load_quantized(SAVED / "native_v1")
    assert meta1["format_version"] == 1
    np.testing.assert_array_equal(v1["fc.u"].codes, want["u_codes"])
    np.testing.assert_array_equal(v1["fc.u"].dequantize(), want["u_deq"])
    v2, meta2 = load_quantized(SAVED / "native_v2")
    assert meta2["format_version"] == 2 and isinstance(v2["fc.g"], LatticeLayer)
    np.testing.assert_array_equal(v2["fc.g"].codes, want["g_codes"])
    np.testing.assert_array_equal(v2["fc.g"].dequantize(), want["g_deq"])
    np.testing.assert_array_equal(v2["fc.u"].codes, want["u_codes"])
    u = load_layer(SAVED / "ckpt_uniform.npz")
    np.testing.assert_array_equal(u.dequantize(), want["u_deq"])
    for name in ("ckpt_glvq.npz", "ckpt_glvq.safetensors"):
        g = load_layer(SAVED / name)
        np.testing.assert_array_equal(g.dequantize(), want["g_deq"])
    # written again now, the files are the same: tensors byte for byte, config equal
    import tempfile

    for name, scale_dtype in (("native_v1", "float32"), ("native_v2", "float16")):
        layers, meta = load_quantized(SAVED / name)
        with tempfile.TemporaryDirectory() as tmp:
            p = save_quantized(Path(tmp) / "q", layers, meta["spec"], meta["model"], scale_dtype=scale_dtype)
            # tensors byte for byte (the header now also carries the config's checksum)
            from safetensors.numpy import load_file

            new, old = load_file(str(p / "quantized.safetensors")), load_file(str(SAVED / name / "quantized.safetensors"))
            assert list(new) == list(old)
            assert all(new[k].dtype == old[k].dtype and new[k].tobytes() == old[k].tobytes() for k in old)
            resaved = json.loads((p / "quant_config.json").read_text())
            assert resaved.pop("checksums")["algorithm"] == "sha256"  # re-saving adds checksums
            assert resaved == meta
