"""LLM low-bit quantization on top of :mod:`bils`: calibrate, quantize, save, evaluate.

The usual path, from a transformers causal LM::

    from llm_adapter import (QuantSpec, calibration_windows, evaluation_windows, load_model,
                             load_text, perplexity, quantize_model, save_quantized)

    model, tok = load_model("smollm2-135m")
    calib = calibration_windows(tok, load_text("shakespeare", split="calibration"),
                                n_windows=128, seqlen=512, seed=0)
    spec = QuantSpec(bits=3, group_size=128, method="ojbkq")
    layers = quantize_model(model, calib, spec)
    print(perplexity(model, evaluation_windows(tok, load_text("shakespeare", split="evaluation"),
                                               n_windows=32, seqlen=512)).ppl)
    save_quantized("smollm2-w3g128", layers, spec.to_dict())

Submodules: :mod:`llm_adapter.data` (corpora and token windows),
:mod:`llm_adapter.models` (loading, GGUF dequantization cache),
:mod:`llm_adapter.calibrate` (block-by-block calibration, :func:`quantize_model`),
:mod:`llm_adapter.quantize` (the pure per-layer :func:`quantize_weight`),
:mod:`llm_adapter.lattice_method` (GLVQ), :mod:`llm_adapter.formats` (native format,
GPTQ export), :mod:`llm_adapter.modules` (``QuantLinear``),
:mod:`llm_adapter.evaluate` (perplexity), :mod:`llm_adapter.cli` (``python -m llm_adapter``).
"""

from .calibrate import quantize_model
from .data import calibration_windows, evaluation_windows, load_text, shakespeare_dir
from .evaluate import PerplexityResult, perplexity
from .formats import export_gptq, load_quantized, save_quantized
from .lattice_method import GLVQSpec, LatticeLayer, quantize_weight_glvq
from .models import DEFAULT_MODEL, load_model
from .quantize import quantize_weight
from .quantized import QuantizedLayer
from .spec import QuantSpec

__all__ = [
    "DEFAULT_MODEL",
    "GLVQSpec",
    "LatticeLayer",
    "PerplexityResult",
    "QuantSpec",
    "QuantizedLayer",
    "calibration_windows",
    "evaluation_windows",
    "export_gptq",
    "load_model",
    "load_quantized",
    "load_text",
    "perplexity",
    "quantize_model",
    "quantize_weight",
    "quantize_weight_glvq",
    "save_quantized",
    "shakespeare_dir",
]
