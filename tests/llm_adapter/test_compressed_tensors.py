"""The compressed-tensors export, read back by the ``compressed-tensors`` library itself:
its own decompression gives exactly our dequantized weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llm_adapter import QuantSpec
from llm_adapter.calibration import quantize_model
from llm_adapter.formats.compressed_tensors import CompressedTensorsExportError, export_compressed_tensors
from tests.llm_adapter.test_architectures import _windows, tiny_model

ct = pytest.importorskip("compressed_tensors")


def _decompress(path):
    """Every layer of the checkpoint decompressed by compressed-tensors' own compressor."""
    from safetensors.torch import load_file
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    cfg = QuantizationConfig.model_validate(json.loads((path / "config.json").read_text())["quantization_config"])
    scheme = cfg.config_groups["group_0"]
    sd = load_file(str(path / "model.safetensors"))
    names = [k[: -len(".weight_packed")] for k in sd if k.endswith(".weight_packed")]
    out = {}
    for n in names:
        local = {k[len(n) + 1:]: v for k, v in sd.items() if k.startswith(n + ".weight_")}
        out[n] = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
    return out, cfg, sd


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, False), (3, -1, False), (8, 16, True), (2, 32, False)])
def test_round_trip_bit_identical(tmp_path, family, bits, group_size, sym):
    model = tiny_model(family)
    layers = quantize_model(model, _windows(n=2), QuantSpec(bits=bits, group_size=group_size, sym=sym,
                                                            method="gptq"), backend="numpy", progress=False)
    path = export_compressed_tensors(model, layers, tmp_path / "ct", dtype=torch.float32)
    got, cfg, sd = _decompress(path)
    assert set(got) == set(layers)
    assert cfg.format == "pack-quantized" and cfg.config_groups["group_0"].weights.symmetric == sym
    for name, layer in layers.items():
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], torch.from_numpy(layer.dequantize())), name
    # float16 scales: equal to our weights computed with the fp16 scales, rounded to fp16
    path16 = export_compressed_tensors(model, layers, tmp_path / "ct16")
    got16, _, sd16 = _decompress(path16)
    for name, layer in layers.items():
        s16 = layer.scales.astype(np.float16).astype(np.float32)[:, layer.g_idx]
        want = (s16 * (layer.codes.astype(np.float32) - layer.zeros[:, layer.g_idx])).astype(np.float16)
        assert torch.equal(got16[name], torch.from_numpy(want)), name
    assert "lm_head" in cfg.ignore
    assert all(v.dtype == torch.float16 for k, v in sd16.items() if v.is_floating_point())


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "gpt2", "phi3"])
def test_checkpoint_names_and_experts(tmp_path, family):
    """The checkpoint has the tensor names save_pretrained writes (Mixtral: fused experts back
    to block_sparse_moe.experts.<e>.w1/w3/w2), and every decompressed weight equals the
    quantized model's, as save_pretrained writes it, bit for bit."""
    from safetensors.torch import load_file

    model = tiny_model(family)
    layers = quantize_model(model, _windows(n=2), QuantSpec(bits=4, group_size=16, method="gptq"),
                            backend="numpy", progress=False)  # the model now holds the dequantized weights
    path = export_compressed_tensors(model, layers, tmp_path / "ct", dtype=torch.float32)
    model.save_pretrained(tmp_path / "ref")
    ref = load_file(str(tmp_path / "ref" / "model.safetensors"))
    got, cfg, sd = _decompress(path)
    plain = {k for k in sd if not k.rsplit(".", 1)[-1].startswith("weight_")}
    assert {f"{n}.weight" for n in got} | plain == set(ref)
    for name, w in got.items():
        want = ref[f"{name}.weight"]
        if family == "gpt2":  # Conv1D: stored as the equivalent Linear, (out, in)
            want = want.T
        assert torch.equal(w, want), name
    for key in plain:
        assert torch.equal(sd[key], ref[key]), key
    if family == "mixtral":
        assert "model.layers.0.block_sparse_moe.experts.3.w3" in got


def test_refusals(tmp_path):
    model = tiny_model("mixtral")
    layers = quantize_model(model, _windows(n=2), QuantSpec(bits=4, group_size=-1, method="rtn"), progress=False)
    del layers["model.layers.0.mlp.experts.down_proj.2"]
    with pytest.raises(CompressedTensorsExportError, match=r"experts \[2\] are not quantized"):
        export_compressed_tensors(model, layers, tmp_path / "x")
    llama = tiny_model("llama")
    odd = quantize_model(llama, _windows(n=2), QuantSpec(bits=4, group_size=24, method="rtn"), progress=False)
    with pytest.raises(CompressedTensorsExportError, match="does not divide"):
        export_compressed_tensors(llama, odd, tmp_path / "y")


@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, -1)])
def test_library_compression_writes_our_tensors(bits, group_size):
    """compressed-tensors' own compressor, given our grid and our dequantized weight, packs
    exactly our weight_packed and weight_zero_point."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from llm_adapter.formats.compressed_tensors import compressed_tensors_config, compressed_tensors_tensors

    model = tiny_model("llama")
    layers = quantize_model(model, _windows(n=2), QuantSpec(bits=bits, group_size=group_size, method="gptq"),
                            backend="numpy", progress=False)
    scheme = QuantizationConfig.model_validate(compressed_tensors_config(
        bits=bits, group_size=group_size, sym=False, ignore=[])).config_groups["group_0"]
    half = 1 << (bits - 1)
    for name, layer in layers.items():
        ours = compressed_tensors_tensors(name, layer, scale_dtype=np.float32)
        state = {"weight": torch.from_numpy(layer.dequantize()), "weight_scale": torch.from_numpy(layer.scales),
                 "weight_zero_point": torch.from_numpy(layer.zeros - half).to(torch.int8)}
        lib = PackedQuantizationCompressor.compress(state, scheme)
        assert torch.equal(lib["weight_packed"], torch.from_numpy(ours[f"{name}.weight_packed"])), name
        assert torch.equal(lib["weight_zero_point"], torch.from_numpy(ours[f"{name}.weight_zero_point"])), name


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_transformers_loads_the_checkpoint(tmp_path, family):
    """transformers' compressed-tensors integration loads a symmetric checkpoint and gives the
    quantized model's logits exactly (float32). (Asymmetric ones it cannot load in transformers
    5.24 with compressed-tensors 0.20: its loader expects unpacked zero points, while the
    library's compressor and vLLM use packed ones.)"""
    from transformers import AutoModelForCausalLM

    model = tiny_model(family)
    win = _windows(n=2)
    layers = quantize_model(model, win, QuantSpec(bits=4, group_size=32, sym=True, method="gptq"), backend="numpy",
                            progress=False)
    path = export_compressed_tensors(model, layers, tmp_path / "ct", dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=win).logits, model(input_ids=win).logits)
