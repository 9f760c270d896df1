"""Issue #17, reproducer 10: the stored formats detect corruption and reject meaningless values.

* Byte flips in tensor data of a native directory (uniform v1 and glvq v2) are detected
  100 % (SHA-256 per tensor), anywhere else in the files they are a clear error or change
  nothing.
* A negative / zero / non-finite scale, a non-integer or out-of-range zero point, a bad
  ``g_idx`` group map are rejected on load even with valid checksums (a writer that is not
  this library).
* Byte flips in ``quant_config.json`` (incl. ones that make it invalid UTF-8) are a
  ``QuantizedFormatError`` naming the file.
* Files without checksums (written before) still load, with an ``IntegrityWarning``.
* The GPTQ export: flips in its tensors or its config are caught by ``verify_gptq``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from llm_adapter.errors import IntegrityWarning, QuantizedFormatError
from llm_adapter.formats import export_gptq, load_quantized, save_quantized
from llm_adapter.formats._integrity import json_digest, tensor_digest
from llm_adapter.formats.gptq import verify_gptq
from llm_adapter.methods.glvq import GLVQSpec, quantize_weight_glvq
from llm_adapter.methods.uniform import QuantizedLayer, QuantSpec, quantize_weight
from tests.llm_fixtures import tiny_llama

SAVED = Path(__file__).parent / "data" / "saved_before_16"


def _uniform(rng, out=8, inp=64, bits=4, gs=32):
    ng = inp // gs
    return QuantizedLayer(codes=rng.integers(0, 2**bits, (out, inp)).astype(np.uint8),
                          scales=rng.uniform(0.01, 1, (out, ng)).astype(np.float32),
                          zeros=rng.integers(0, 2**bits, (out, ng)).astype(np.float32),
                          g_idx=(np.arange(inp) // gs).astype(np.int32), bits=bits, group_size=gs,
                          bias=rng.standard_normal(out).astype(np.float32))


def _glvq(rng):
    W = rng.standard_normal((8, 32))
    X = rng.standard_normal((32, 96))
    return quantize_weight_glvq(W, X @ X.T, spec=GLVQSpec(bits=2, d=4, group_size=16, n_iter=2,
                                                         encode="nearest_plane"), backend="numpy")


def _layers(kind, rng):
    if kind == "v1":
        return {"m.a": _uniform(rng), "m.b": _uniform(rng, bits=3, gs=64)}
    return {"m.u": _uniform(rng, bits=2), "m.g": _glvq(rng)}


def _same(a, b) -> bool:
    if list(a) != list(b):
        return False
    for name in a:
        x, y = a[name].to_arrays(), b[name].to_arrays()
        if set(x) != set(y) or any(not np.array_equal(np.asarray(x[k]), np.asarray(y[k])) for k in x):
            return False
    return True


def _flip(path: Path, pos: int, mask: int) -> bytes:
    data = bytearray(path.read_bytes())
    original = bytes(data)
    data[pos] ^= mask
    path.write_bytes(bytes(data))
    return original


@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_every_byte_flip_in_tensor_data_is_detected(tmp_path, kind):
    rng = np.random.default_rng(10)
    layers = _layers(kind, rng)
    path = save_quantized(tmp_path / "q", layers, {"bits": 4})
    assert json.loads((path / "quant_config.json").read_text())["format_version"] == (1 if kind == "v1" else 2)
    st = path / "quantized.safetensors"
    data = st.read_bytes()
    start = 8 + int.from_bytes(data[:8], "little")
    positions = rng.choice(np.arange(start, len(data)), size=min(150, len(data) - start), replace=False)
    for pos in positions:
        original = _flip(st, int(pos), int(rng.integers(1, 256)))
        with pytest.raises(QuantizedFormatError, match="quantized.safetensors"):
            load_quantized(path)
        st.write_bytes(original)
    got, _ = load_quantized(path)
    assert _same(layers, got)


def test_byte_flips_in_the_safetensors_header_are_an_error_or_change_nothing(tmp_path):
    rng = np.random.default_rng(11)
    layers = _layers("v2", rng)
    path = save_quantized(tmp_path / "q", layers)
    st = path / "quantized.safetensors"
    data = st.read_bytes()
    end = 8 + int.from_bytes(data[:8], "little")
    for pos in rng.choice(end, size=120, replace=False):
        original = _flip(st, int(pos), int(rng.integers(1, 256)))
        try:
            got, _ = load_quantized(path)
        except QuantizedFormatError as err:
            assert "quantized.safetensors" in str(err) or "quant_config.json" in str(err)
        else:
            assert _same(layers, got), f"flip at header byte {pos} loaded different layers"
        st.write_bytes(original)


def _rewrite_with_checksums(path: Path, edit):
    """Edit the tensors of a native directory and write them back with *valid* checksums
    (what a foreign writer would produce), so the value checks are what rejects them."""
    from safetensors.numpy import load_file, save_file

    st = path / "quantized.safetensors"
    tensors = load_file(str(st))
    edit(tensors)
    cfg = json.loads((path / "quant_config.json").read_text())
    cfg["checksums"]["tensors"] = {k: tensor_digest(v) for k, v in tensors.items()}
    save_file(tensors, str(st), metadata={"format": "bils-quantized", "bils.config_sha256": cfg["checksums"]["config"]})
    (path / "quant_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("field, value, match", [
    ("scales", -0.5, "`scales` must be positive and finite"),
    ("scales", 0.0, "`scales` must be positive and finite"),
    ("scales", np.inf, "`scales` must be positive and finite"),
    ("zeros", 2.5, r"`zeros` must be integers in \[0, 15\]"),
    ("zeros", 16.0, r"`zeros` must be integers in \[0, 15\]"),
    ("zeros", -1.0, r"`zeros` must be integers in \[0, 15\]"),
    ("g_idx", None, "`g_idx` is not a valid group map"),
])
def test_meaningless_values_are_rejected_on_load(tmp_path, field, value, match):
    rng = np.random.default_rng(12)
    path = save_quantized(tmp_path / "q", {"m.a": _uniform(rng)})

    def edit(t):
        if field == "g_idx":
            t["m.a.g_idx"][:] = 0  # every column in group 0: not a map of 2 groups of 32
        else:
            t[f"m.a.{field}"][1, 0] = value

    _rewrite_with_checksums(path, edit)
    with pytest.raises(QuantizedFormatError, match=match) as info:
        load_quantized(path)
    assert "m.a" in str(info.value)


def test_meaningless_values_are_rejected_on_save(tmp_path):
    rng = np.random.default_rng(13)
    q = _uniform(rng)
    for field, value in (("scales", -1.0), ("zeros", 0.5)):
        bad = QuantizedLayer(**{**q.__dict__, field: np.where(np.arange(q.scales.size).reshape(q.scales.shape) == 0,
                                                                value, getattr(q, field)).astype(np.float32)})
        with pytest.raises(QuantizedFormatError, match=f"`{field}`"):
            save_quantized(tmp_path / field, {"m.a": bad})
        assert not (tmp_path / field).exists()


def test_glvq_values_are_checked_on_load(tmp_path):
    rng = np.random.default_rng(14)
    path = save_quantized(tmp_path / "q", {"m.g": _glvq(rng)})
    _rewrite_with_checksums(path, lambda t: t["m.g.group_bits"].__setitem__(0, 7))  # above pack width 2
    with pytest.raises(QuantizedFormatError, match="`group_bits` must lie in"):
        load_quantized(path)


def test_config_byte_flips_name_the_file(tmp_path):
    rng = np.random.default_rng(15)
    layers = _layers("v1", rng)
    path = save_quantized(tmp_path / "q", layers, {"bits": 4, "method": "gptq"}, {"source": "tiny"})
    cfg = path / "quant_config.json"
    good_meta = load_quantized(path)[1]
    size = len(cfg.read_bytes())
    errors = silent = 0
    for i, pos in enumerate(rng.choice(size, size=min(200, size), replace=False)):
        mask = 0x80 if i % 3 == 0 else int(rng.integers(1, 256))  # 0x80: often invalid UTF-8
        original = _flip(cfg, int(pos), mask)
        try:
            got, meta = load_quantized(path)
        except QuantizedFormatError as err:
            assert "quant_config.json" in str(err), err
            errors += 1
        else:
            assert _same(layers, got) and meta == good_meta, f"flip at {pos} loaded something else"
            silent += 1  # a flip JSON ignores (whitespace) changes nothing
        cfg.write_bytes(original)
    assert errors > 0.9 * (errors + silent)


def test_invalid_utf8_config_is_a_format_error(tmp_path):
    path = save_quantized(tmp_path / "q", {"m.a": _uniform(np.random.default_rng(16))})
    cfg = path / "quant_config.json"
    cfg.write_bytes(cfg.read_bytes()[:20] + b"\xff\xfe" + cfg.read_bytes()[22:])
    with pytest.raises(QuantizedFormatError, match=r"quant_config.json is not UTF-8"):
        load_quantized(path)


def test_files_without_checksums_load_with_a_warning(tmp_path):
    with pytest.warns(IntegrityWarning, match="no checksums"):
        layers, meta = load_quantized(SAVED / "native_v1")
    assert "checksums" not in meta and layers
    # re-saving adds them; then no warning
    path = save_quantized(tmp_path / "q", layers, meta["spec"], meta["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", IntegrityWarning)
        again, _ = load_quantized(path)
    assert _same(layers, again)


def test_removing_the_checksums_from_one_file_is_an_error(tmp_path):
    from safetensors.numpy import load_file, save_file

    path = save_quantized(tmp_path / "q", {"m.a": _uniform(np.random.default_rng(19))})
    cfg = json.loads((path / "quant_config.json").read_text())
    cfg["checksumz"] = cfg.pop("checksums")  # a flipped byte in the key
    (path / "quant_config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantizedFormatError, match="records checksums but .*quant_config.json does not"):
        load_quantized(path)
    path = save_quantized(tmp_path / "q2", {"m.a": _uniform(np.random.default_rng(19))})
    st = str(path / "quantized.safetensors")
    save_file(load_file(st), st, metadata={"format": "bils-quantized"})
    with pytest.raises(QuantizedFormatError, match="records checksums but .*quantized.safetensors does not"):
        load_quantized(path)


def test_checksums_do_not_depend_on_the_json_layout(tmp_path):
    path = save_quantized(tmp_path / "q", {"m.a": _uniform(np.random.default_rng(17))})
    cfg = json.loads((path / "quant_config.json").read_text())
    assert cfg["checksums"]["config"] == json_digest({k: v for k, v in cfg.items() if k != "checksums"})
    (path / "quant_config.json").write_text(json.dumps(cfg, indent=7, sort_keys=True))  # re-indented
    load_quantized(path)


# ------------------------------------------------------------------ GPTQ export
def _gptq_export(tmp_path):
    import torch

    model = tiny_llama()
    rng = np.random.default_rng(18)
    layers = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.endswith("mlp.up_proj"):
            W = mod.weight.detach().numpy().astype(np.float64)
            layers[name] = quantize_weight(W, spec=QuantSpec(bits=4, group_size=32, method="rtn", sym=True))
    assert layers
    return export_gptq(model, layers, tmp_path / "gptq"), rng


def test_gptq_export_flips_are_detected(tmp_path):
    path, rng = _gptq_export(tmp_path)
    config, tensors = verify_gptq(path)
    assert config["quantization_config"]["bits"] == 4
    st = path / "model.safetensors"
    data = st.read_bytes()
    start = 8 + int.from_bytes(data[:8], "little")
    for pos in rng.choice(np.arange(start, len(data)), size=60, replace=False):
        original = _flip(st, int(pos), int(rng.integers(1, 256)))
        with pytest.raises(QuantizedFormatError, match="model.safetensors"):
            verify_gptq(path)
        st.write_bytes(original)
    cfg = path / "config.json"
    for pos in rng.choice(len(cfg.read_bytes()), size=60, replace=False):
        original = _flip(cfg, int(pos), int(rng.integers(1, 256)))
        try:
            got, _ = verify_gptq(path)
        except QuantizedFormatError as err:
            assert "config.json" in str(err)
        else:
            assert got == config
        cfg.write_bytes(original)


# ------------------------------------------------------------------ properties
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def _random_layer(draw):
    bits = draw(st.sampled_from([2, 3, 4, 8]))
    out = draw(st.integers(1, 6))
    inp = draw(st.integers(1, 40))
    gs = draw(st.sampled_from([-1, 1, 3, 8, 16, 64]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    gsz = inp if gs == -1 else gs
    ng = -(-inp // gsz)
    g_idx = (np.arange(inp) // gsz).astype(np.int32)
    perm = None
    if draw(st.booleans()):
        perm = rng.permutation(inp)
        g_idx = np.empty(inp, np.int32)
        g_idx[perm] = np.arange(inp) // gsz
    return QuantizedLayer(codes=rng.integers(0, 2**bits, (out, inp)).astype(np.uint8),
                          scales=rng.uniform(1e-4, 10, (out, ng)).astype(np.float32),
                          zeros=rng.integers(0, 2**bits, (out, ng)).astype(np.float32),
                          g_idx=g_idx, bits=bits, group_size=gs, perm=perm,
                          bias=rng.standard_normal(out).astype(np.float32) if draw(st.booleans()) else None)


@settings(max_examples=40, deadline=None)
@given(layer=_random_layer(), where=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255),
       scale_dtype=st.sampled_from(["float32", "float16"]))
def test_any_layer_round_trips_and_any_tensor_flip_is_detected(tmp_path_factory, layer, where, mask, scale_dtype):
    path = save_quantized(tmp_path_factory.mktemp("q") / "q", {"m.l": layer}, scale_dtype=scale_dtype)
    got = load_quantized(path)[0]["m.l"]
    np.testing.assert_array_equal(got.codes, layer.codes)
    np.testing.assert_array_equal(got.g_idx, layer.g_idx)
    want_scales = layer.scales.astype(np.float16).astype(np.float32) if scale_dtype == "float16" else layer.scales
    np.testing.assert_array_equal(got.scales, want_scales)
    st_path = path / "quantized.safetensors"
    data = bytearray(st_path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    pos = start + int(where * (len(data) - start))
    data[pos] ^= mask
    st_path.write_bytes(bytes(data))
    with pytest.raises(QuantizedFormatError, match="quantized.safetensors"):
        load_quantized(path)
