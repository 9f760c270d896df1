"""Quantization methods: a public registry, one module per method.

>>> from llm_adapter import methods
>>> methods.names()
('rtn', 'gptq', 'ojbkq', 'regcal', 'glvq')
>>> m = methods.get("glvq")
>>> m.spec_type.__name__, m.layer_type.__name__, m.format.kind
('GLVQSpec', 'LatticeLayer', 'glvq')

A method is one :class:`Method`: its spec type, a pure
``quantize(W, H, D, spec, *, backend, rng, bias) -> layer``, the layer type (with
``to_arrays`` / ``from_arrays`` / ``dequantize``), its stored format and its torch module.
The calibration driver, :mod:`llm_adapter.formats`, :mod:`llm_adapter.nn` and the CLI
look methods up here. The four uniform-grid methods (:mod:`~llm_adapter.methods.rtn`,
:mod:`~llm_adapter.methods.gptq`, :mod:`~llm_adapter.methods.ojbkq`,
:mod:`~llm_adapter.methods.regcal`) share :mod:`~llm_adapter.methods.uniform` and differ in
one ``solve`` function each; :mod:`~llm_adapter.methods.glvq` is a unit of its own. A new
method is one module that calls :func:`register` (or
:func:`~llm_adapter.methods.uniform.register_uniform`); see ``docs/architecture.md``.
"""

from .registry import (LayerFormat, Method, for_kind, for_layer, for_spec, get, names, register, spec_from_dict,
                       unregister)

# the built-in methods register themselves on import, in this order
from . import rtn, gptq, ojbkq, regcal, glvq  # noqa: E402,F401  isort: skip

__all__ = ["LayerFormat", "Method", "for_kind", "for_layer", "for_spec", "get", "names", "register",
           "spec_from_dict", "unregister"]
