"""``llm-adapter``: quantize, evaluate, generate, demo.

::

    llm-adapter quantize --method gptq --bits 3 --group-size 128 --out q3/
    llm-adapter quantize --method glvq --bits 2 --lattice-dim 8 --out w2-glvq/
    llm-adapter evaluate --quantized q3/
    llm-adapter generate --quantized q3/ --prompt "To be, or not to be"
    llm-adapter demo

One module per command (:mod:`.quantize`, :mod:`.evaluate`, :mod:`.generate`,
:mod:`.demo`), the parser and entry point in :mod:`.main`. ``--method`` and the
method-specific options come from the method registry (:mod:`llm_adapter.methods`).
Errors in the arguments (an unknown model, a missing corpus or file, bad bits or group
options) exit with status 2 and a message naming the flag: library errors carry the
parameter (:class:`llm_adapter.errors.ParameterError`) and the method maps it to its flag.
Logging goes to stderr (``-v`` for per-layer details), tables and results to stdout.
"""

from .common import CLIError, layer_table, load_quantized_model
from .main import build_parser, main

__all__ = ["CLIError", "build_parser", "layer_table", "load_quantized_model", "main"]
