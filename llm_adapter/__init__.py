"""LLM low-bit quantization on top of :mod:`bils`: models, data, evaluation.

Submodules: :mod:`llm_adapter.data` (corpora and token windows),
:mod:`llm_adapter.models` (loading, GGUF dequantization cache),
:mod:`llm_adapter.evaluate` (perplexity).
"""

from .data import calibration_windows, evaluation_windows, load_text, shakespeare_dir
from .evaluate import PerplexityResult, perplexity
from .models import DEFAULT_MODEL, load_model

__all__ = [
    "DEFAULT_MODEL",
    "PerplexityResult",
    "calibration_windows",
    "evaluation_windows",
    "load_model",
    "load_text",
    "perplexity",
    "shakespeare_dir",
]
