"""On-disk formats for quantized layers.

* :mod:`~llm_adapter.formats.packing` — b-bit codes packed into int32 words (GPTQ layout).
* :mod:`~llm_adapter.formats.native` — the library's own directory format
  (:func:`save_quantized` / :func:`load_quantized`), written atomically.
* :mod:`~llm_adapter.formats._io` — the one module that writes files and directories
  atomically (temporary sibling, fsync, :func:`os.replace`); every writer uses it.
  :func:`claim_dir` (re-exported here) locks a target directory for one writer and repairs
  what a killed writer left.
* :mod:`~llm_adapter.formats.gptq` — export as a transformers-style GPTQ checkpoint
  (:func:`export_gptq`).
* :mod:`~llm_adapter.formats.compressed_tensors` — export as a compressed-tensors
  ``pack-quantized`` checkpoint, the format vLLM loads (:func:`export_compressed_tensors`).
"""

from ._io import claim_dir
from .compressed_tensors import CompressedTensorsExportError, export_compressed_tensors
from .gptq import GPTQExportError, export_gptq
from .native import QuantizedFormatError, load_quantized, save_quantized
from .packing import pack, packed_length, unpack

__all__ = [
    "CompressedTensorsExportError",
    "GPTQExportError",
    "claim_dir",
    "QuantizedFormatError",
    "export_compressed_tensors",
    "export_gptq",
    "load_quantized",
    "pack",
    "packed_length",
    "save_quantized",
    "unpack",
]
