"""Torch modules that run quantized layers: :class:`QuantLinear` (uniform integer grids),
:class:`LatticeLinear` (glvq), and :func:`replace_linear`.

Each registered method names its module (:attr:`llm_adapter.methods.Method.module`); the
module class has ``from_layer(layer, *, bias=None)`` and ``supports(layer)``.
"""

from .linear import (QUANT_LINEAR_BITS, QUANT_LINEAR_GROUP_SIZES, LatticeLinear, QuantLinear, dequantize_packed,
                     has_cuda_kernel, quant_matmul, replace_linear, unpack_torch)
from .fused import write_dequantized

__all__ = ["QUANT_LINEAR_BITS", "QUANT_LINEAR_GROUP_SIZES", "LatticeLinear", "QuantLinear", "dequantize_packed",
           "has_cuda_kernel", "quant_matmul", "replace_linear", "unpack_torch", "write_dequantized"]
