"""On-disk formats (native, GPTQ export read back by an independent reader) and the CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from tests.gptq_reader import read_gptq
from tests.llm_fixtures import dequantized_perplexity, run_cli, tiny_llama, tiny_tokenizer
from tests.llm_adapter.test_nn import fp16_scales, random_layer

from llm_adapter.formats import (
    GPTQExportError,
    QuantizedFormatError,
    export_gptq,
    load_quantized,
    save_quantized,
)
from llm_adapter.formats import native


def _same_layer(a, b):
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.scales, b.scales)
    np.testing.assert_array_equal(a.zeros, b.zeros)
    np.testing.assert_array_equal(a.g_idx, b.g_idx)
    assert (a.bits, a.group_size) == (b.bits, b.group_size)
    for field in ("bias", "perm"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.dequantize(), b.dequantize())


def _tiny_layers(model, rng, bits, group_size, *, act_order=False, bias=False, zero_range=None):
    layers = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            out_f, in_f = mod.weight.shape
            layers[name] = random_layer(rng, out_f, in_f, bits, group_size, act_order=act_order, bias=bias,
                                        zero_range=zero_range)
    return layers


# --------------------------------------------------------------------------- native format


def test_native_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    layers = {
        "a.q": random_layer(rng, 16, 64, 3, 32),
        "a.k": random_layer(rng, 7, 77, 2, 32, act_order=True),  # partial last group, odd sizes
        "b.up": random_layer(rng, 5, 40, 4, -1, bias=False),
        "b.down": random_layer(rng, 9, 33, 8, 16),
    }
    spec = {"bits": 3, "group_size": 32, "method": "gptq"}
    info = {"source": "tiny", "config": {"hidden_size": 64}}
    path = save_quantized(tmp_path / "q", layers, spec, info)
    assert sorted(p.name for p in path.iterdir()) == ["quant_config.json", "quantized.safetensors"]
    loaded, meta = load_quantized(path)
    assert list(loaded) == list(layers)
    for name in layers:
        _same_layer(loaded[name], layers[name])
        assert loaded[name].stats == layers[name].stats
    assert meta["spec"] == spec and meta["model"] == info
    assert meta["format"] == "bils-quantized" and meta["library"]["name"] == "bils"
    assert meta["layers"]["a.q"]["bits"] == 3 and meta["bits"] == [2, 3, 4, 8]
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # no temporary leftovers


def test_native_fp16_scales(tmp_path):
    rng = np.random.default_rng(1)
    layer = random_layer(rng, 8, 64, 4, 32)
    loaded, meta = load_quantized(save_quantized(tmp_path / "q", {"l": layer}, scale_dtype="float16"))
    assert meta["scale_dtype"] == "float16"
    np.testing.assert_array_equal(loaded["l"].dequantize(), fp16_scales(layer).dequantize())


def test_native_refuses_existing_dir_and_overwrites_atomically(tmp_path):
    rng = np.random.default_rng(2)
    a, b = random_layer(rng, 8, 32, 4, 32), random_layer(rng, 8, 32, 4, 32)
    save_quantized(tmp_path / "q", {"l": a})
    with pytest.raises(FileExistsError, match="already exists"):
        save_quantized(tmp_path / "q", {"l": b})
    save_quantized(tmp_path / "q", {"l": b}, overwrite=True)
    _same_layer(load_quantized(tmp_path / "q")[0]["l"], b)
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


@pytest.mark.parametrize("stage", ["tensors", "replace"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_native_failure_leaves_nothing_half_written(tmp_path, monkeypatch, stage, overwrite):
    rng = np.random.default_rng(3)
    old, new = random_layer(rng, 8, 32, 4, 32), random_layer(rng, 8, 32, 3, 32)
    target = tmp_path / "q"
    if overwrite:
        save_quantized(target, {"l": old})
    import safetensors.numpy

    real_save, real_replace = safetensors.numpy.save_file, os.replace

    def failing_save(tensors, filename, metadata=None):
        real_save(dict(list(tensors.items())[:1]), filename, metadata=metadata)  # a partial file...
        raise OSError("disk full (injected)")  # ...then the failure

    failed = []

    def failing_replace(src, dst):
        if str(dst) == str(target) and not failed:  # the rename of the new directory only
            failed.append(dst)
            raise OSError("rename failed (injected)")
        return real_replace(src, dst)

    if stage == "tensors":
        monkeypatch.setattr(safetensors.numpy, "save_file", failing_save)
    else:
        monkeypatch.setattr(native.os, "replace", failing_replace)
    with pytest.raises(OSError, match="injected"):
        save_quantized(target, {"l": new}, overwrite=overwrite)
    monkeypatch.undo()
    if overwrite:
        assert [p.name for p in tmp_path.iterdir()] == ["q"]
        _same_layer(load_quantized(target)[0]["l"], old)
    else:
        assert list(tmp_path.iterdir()) == []


def test_native_save_validates_layers(tmp_path):
    rng = np.random.default_rng(4)
    bad = random_layer(rng, 8, 32, 3, 32)
    bad.codes[0, 0] = 9
    with pytest.raises(QuantizedFormatError, match=r"layer 'x.y': `codes` must lie in \[0, 7\]"):
        save_quantized(tmp_path / "q", {"x.y": bad})
    bad = random_layer(rng, 8, 32, 3, 32)
    bad.g_idx = bad.g_idx + 1
    with pytest.raises(QuantizedFormatError, match=r"layer 'x.y': `g_idx` must lie in \[0, 0\]"):
        save_quantized(tmp_path / "q", {"x.y": bad})
    assert list(tmp_path.iterdir()) == []


def _corrupt(path, edit):
    """Edit quant_config.json as a file without checksums would be (the checksum check is
    tested in test_format_integrity.py; here the checks behind it)."""
    from safetensors.numpy import load_file, save_file

    cfg = json.loads((path / "quant_config.json").read_text())
    cfg.pop("checksums", None)
    st = str(path / "quantized.safetensors")
    save_file(load_file(st), st, metadata={"format": "bils-quantized"})
    edit(cfg)
    (path / "quant_config.json").write_text(json.dumps(cfg))


@pytest.mark.filterwarnings("ignore::llm_adapter.errors.IntegrityWarning")
def test_native_load_errors_name_the_problem(tmp_path):
    rng = np.random.default_rng(5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_quantized(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="missing quant_config.json"):
        load_quantized(tmp_path / "empty")

    def fresh(name):
        return save_quantized(tmp_path / name, {"m.l": random_layer(rng, 8, 64, 4, 32)})

    p = fresh("fmt")
    _corrupt(p, lambda c: c.update(format="other"))
    with pytest.raises(QuantizedFormatError, match="`format` must be 'bils-quantized'"):
        load_quantized(p)
    p = fresh("ver")
    _corrupt(p, lambda c: c.update(format_version=99))
    with pytest.raises(QuantizedFormatError, match="`format_version` 99 is not supported"):
        load_quantized(p)
    p = fresh("shape")
    _corrupt(p, lambda c: c["layers"]["m.l"].update(in_features=96))
    with pytest.raises(QuantizedFormatError, match=r"layer 'm.l' `qcodes` must be int32 \(8, 12\)"):
        load_quantized(p)
    p = fresh("missing_tensor")
    _corrupt(p, lambda c: c["layers"].update({"m.other": dict(c["layers"]["m.l"])}))
    with pytest.raises(QuantizedFormatError, match="layer 'm.other' has no tensor `qcodes`"):
        load_quantized(p)
    p = fresh("json")
    (p / "quant_config.json").write_text("{not json")
    with pytest.raises(QuantizedFormatError, match="not valid JSON"):
        load_quantized(p)


# --------------------------------------------------------------------------- GPTQ export


@pytest.mark.parametrize(
    "bits, group_size, act_order",
    [(4, 32, False), (3, 32, True), (2, -1, False), (3, 128, False), (8, 64, True)],
)
def test_gptq_export_read_back_independently(tmp_path, bits, group_size, act_order):
    model = tiny_llama()
    rng = np.random.default_rng([bits, group_size + 1])
    # zeros >= 1: v1 stores zero - 1 (see test_gptq_v1_zero_point_zero for zero 0)
    layers = _tiny_layers(model, rng, bits, group_size, act_order=act_order, bias=True,
                          zero_range=(1, (1 << bits) - 1))
    out = export_gptq(model, layers, tmp_path / "gptq", tokenizer=tiny_tokenizer(), damp_percent=0.01)
    config, weights, tensors = read_gptq(out)
    q = config["quantization_config"]
    assert q == {**q, "quant_method": "gptq", "bits": bits, "group_size": group_size, "damp_percent": 0.01,
                 "desc_act": act_order, "sym": False, "true_sequential": True, "format": "gptq",
                 "pack_dtype": "int32", "checkpoint_format": "gptq"}
    assert config["model_type"] == "llama" and config["hidden_size"] == 64
    assert set(weights) == set(layers)
    for name, layer in layers.items():
        np.testing.assert_array_equal(weights[name], fp16_scales(layer).dequantize())
        assert f"{name}.weight" not in tensors
        np.testing.assert_array_equal(tensors[f"{name}.bias"], layer.bias.astype(np.float16))
        out_f, in_f = layer.shape
        assert tensors[f"{name}.qweight"].shape == (in_f * bits // 32, out_f)
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                "model.layers.0.input_layernorm.weight"):
        assert tensors[key].dtype == np.float16
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()


def test_gptq_v1_zero_point_zero(tmp_path):
    model = tiny_llama()
    rng = np.random.default_rng(7)
    layers = _tiny_layers(model, rng, 4, 32, zero_range=(1, 15))
    name = "model.layers.0.self_attn.q_proj"
    # zero 0 in a group whose codes stay below 15: rewritten exactly as zero 1, codes + 1
    layers[name].zeros[:, 0] = 0
    layers[name].codes[:, :32] = np.minimum(layers[name].codes[:, :32], 14)
    _, weights, _ = read_gptq(export_gptq(model, layers, tmp_path / "shift"))
    np.testing.assert_array_equal(weights[name], fp16_scales(layers[name]).dequantize())
    # zero 0 with the top code used: not representable in v1 -> error; v2 stores it
    layers[name].codes[3, 5] = 15
    with pytest.raises(GPTQExportError, match=r"1 \(row, group\) pair\(s\) have zero point 0.*gptq_v2"):
        export_gptq(model, layers, tmp_path / "v1")
    assert not (tmp_path / "v1").exists()
    out = export_gptq(model, layers, tmp_path / "v2", checkpoint_format="gptq_v2")
    config, weights, _ = read_gptq(out)
    assert config["quantization_config"]["checkpoint_format"] == "gptq_v2"
    for n, layer in layers.items():
        np.testing.assert_array_equal(weights[n], fp16_scales(layer).dequantize())


def test_gptq_symmetric_and_tied_embeddings(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    rng = np.random.default_rng(8)
    layers = _tiny_layers(model, rng, 4, 32, zero_range=(8, 8))
    config, weights, tensors = read_gptq(export_gptq(model, layers, tmp_path / "g"))
    assert config["quantization_config"]["sym"] is True
    assert "model.embed_tokens.weight" in tensors and "lm_head.weight" not in tensors
    for n, layer in layers.items():
        np.testing.assert_array_equal(weights[n], fp16_scales(layer).dequantize())


def test_gptq_export_errors(tmp_path):
    model = tiny_llama()
    rng = np.random.default_rng(9)
    layers = _tiny_layers(model, rng, 4, 32, zero_range=(1, 15))
    with pytest.raises(GPTQExportError, match="is not an nn.Linear of the model"):
        export_gptq(model, {"model.layers.0.nope": layers["model.layers.0.self_attn.q_proj"]}, tmp_path / "a")
    mixed = dict(layers)
    mixed["model.layers.0.mlp.up_proj"] = random_layer(rng, 128, 64, 3, 32)
    with pytest.raises(GPTQExportError, match=r"one `bits` and one `group_size`.*bits \[3, 4\]"):
        export_gptq(model, mixed, tmp_path / "b")
    act = _tiny_layers(model, rng, 4, 32, act_order=True, zero_range=(1, 15))
    with pytest.raises(GPTQExportError, match="`desc_act` is False but the g_idx"):
        export_gptq(model, act, tmp_path / "c", desc_act=False)
    with pytest.raises(GPTQExportError, match="`sym` is True"):
        export_gptq(model, layers, tmp_path / "d", sym=True)
    odd = {"model.layers.0.self_attn.q_proj": random_layer(rng, 64, 64, 3, 32)}
    odd["model.layers.0.self_attn.q_proj"].zeros[:] = 0.5
    with pytest.raises(GPTQExportError, match="integer zero points"):
        export_gptq(model, odd, tmp_path / "e")
    assert list(tmp_path.iterdir()) == []


def test_gptq_export_shape_must_fill_words():
    from llm_adapter.formats.gptq import gptq_tensors

    rng = np.random.default_rng(10)
    with pytest.raises(GPTQExportError, match="in_features = 48 is not a multiple of 32"):
        gptq_tensors("l", random_layer(rng, 32, 48, 3, 16))


# --------------------------------------------------------------------------- CLI


_run = run_cli



@pytest.mark.parametrize(
    "argv, flag",
    [
        (["quantize", "--model", "/nonexistent/model_dir", "--out", "{tmp}/q"], "--model"),
        (["quantize", "--calib", "{tmp}/missing.txt", "--out", "{tmp}/q"], "--calib"),
        (["quantize", "--calib", "no_such_corpus", "--out", "{tmp}/q"], "--calib"),
        (["quantize", "--bits", "5", "--out", "{tmp}/q"], "--bits"),
        (["quantize", "--group-size", "0", "--out", "{tmp}/q"], "--group-size"),
        (["quantize", "--group-size", "abc", "--out", "{tmp}/q"], "--group-size"),
        (["quantize", "--method", "magic", "--out", "{tmp}/q"], "--method"),
        (["quantize", "--calib-windows", "0", "--out", "{tmp}/q"], "--calib-windows"),
        (["quantize"], "--out"),
        (["evaluate", "--quantized", "{tmp}/nothing"], "--quantized"),
        (["evaluate", "--text", "{tmp}/missing.txt"], "--text"),
        (["generate", "--model", "/nonexistent/model_dir", "--prompt", "hi"], "--model"),
    ],
)
def test_cli_errors_exit_2_and_name_the_flag(tmp_path, capsys, argv, flag):
    code, _, err = _run(capsys, *(a.format(tmp=tmp_path) for a in argv))
    assert code == 2
    assert flag in err


def test_cli_existing_out_dir(tmp_path, capsys, tiny_dir, text_file):
    (tmp_path / "q").mkdir()
    code, _, err = _run(capsys, "quantize", "--model", tiny_dir, "--calib", text_file, "--out", tmp_path / "q")
    assert code == 2 and "--out" in err and "already exists" in err


def test_cli_quantize_evaluate_generate_end_to_end(tmp_path, capsys, tiny_dir, text_file):
    code, out, err = _run(
        capsys, "quantize", "--model", tiny_dir, "--method", "gptq", "--bits", "4", "--group-size", "32",
        "--calib", text_file, "--calib-windows", "4", "--seqlen", "64", "--backend", "numpy",
        "--out", tmp_path / "q", "--export-gptq", tmp_path / "gptq", "--checkpoint", tmp_path / "ckpt",
    )
    assert code == 0, err
    for column in ("layer", "loss", "rel loss", "Babai bound", "clipped %", "time"):
        assert column in out
    assert "model.layers.1.mlp.down_proj" in out
    layers, meta = load_quantized(tmp_path / "q")
    assert len(layers) == 14 and meta["spec"]["method"] == "gptq"
    assert meta["model"]["source"] == str(tiny_dir.resolve())
    assert all(l.stats["rel_loss"] is not None for l in layers.values())

    # the GPTQ checkpoint holds the same weights (scales rounded to fp16)
    _, weights, _ = read_gptq(tmp_path / "gptq")
    for name, layer in layers.items():
        np.testing.assert_array_equal(weights[name], fp16_scales(layer).dequantize())

    # resuming from the per-layer checkpoints gives the same layers
    code, _, err = _run(
        capsys, "quantize", "--model", tiny_dir, "--method", "gptq", "--bits", "4", "--group-size", "32",
        "--calib", text_file, "--calib-windows", "4", "--seqlen", "64", "--backend", "numpy",
        "--out", tmp_path / "q2", "--checkpoint", tmp_path / "ckpt",
    )
    assert code == 0, err
    for name, layer in load_quantized(tmp_path / "q2")[0].items():
        np.testing.assert_array_equal(layer.codes, layers[name].codes)
    code, _, err = _run(
        capsys, "quantize", "--model", tiny_dir, "--method", "gptq", "--bits", "3", "--calib", text_file,
        "--calib-windows", "4", "--seqlen", "64", "--out", tmp_path / "q3", "--checkpoint", tmp_path / "ckpt",
    )
    assert code == 2 and "--checkpoint" in err

    code, out, err = _run(capsys, "evaluate", "--quantized", tmp_path / "q", "--text", text_file,
                          "--windows", "2", "--seqlen", "64")
    assert code == 0, err
    ppl = float(out.split("perplexity")[1].split()[0])

    # the same perplexity from the dequantized weights, computed here directly
    expected = dequantized_perplexity(tiny_dir, layers, text_file, seqlen=64,
                                      dequantize=lambda l: fp16_scales(l).dequantize())
    assert ppl == pytest.approx(expected, rel=1e-4)

    code, out, err = _run(capsys, "evaluate", "--model", tiny_dir, "--text", text_file, "--windows", "2",
                          "--seqlen", "64")
    assert code == 0, err
    assert float(out.split("perplexity")[1].split()[0]) != pytest.approx(ppl, rel=1e-6)

    code, out, err = _run(capsys, "generate", "--quantized", tmp_path / "q", "--prompt", "the king",
                          "--max-new-tokens", "5")
    assert code == 0, err
    assert out.startswith("the king")


def test_cli_demo_smoke(capsys, tiny_dir, text_file):
    code, out, err = _run(capsys, "demo", "--model", tiny_dir, "--methods", "rtn", "gptq", "ojbkq", "regcal",
                          "--calib", text_file, "--text", text_file,
                          "--calib-windows", "2", "--seqlen", "32", "--windows", "2", "--backend", "numpy")
    assert code == 0, err
    assert "calibration: 2 random windows" in out
    table = out[out.index("method"):]
    for row in ("float (fp32)", "rtn", "gptq", "ojbkq", "regcal"):
        assert row in table
